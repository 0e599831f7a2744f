"""Prometheus metrics of one server, in a registry of its own (prometheus_client)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, stats, models):
        self.registry = CollectorRegistry()
        self.requests = Counter("sdfast_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.request_seconds = Histogram("sdfast_request_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                         buckets=REQUEST_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("sdfast_stage_seconds", "Engine stage latency (unet_step: one sampler evaluation)", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.images = Counter("sdfast_images", "Images generated", registry=self.registry)
        queue = Gauge("sdfast_queue_depth", "Jobs waiting for the engine", registry=self.registry)
        queue.set_function(lambda: stats.queued)
        in_flight = Gauge("sdfast_in_flight", "Jobs the engine is running now", registry=self.registry)
        in_flight.set_function(lambda: stats.in_flight)
        batches = Gauge("sdfast_engine_batches", "Engine batches run since start", registry=self.registry)
        batches.set_function(lambda: stats.batches)
        merged = Gauge("sdfast_merged_jobs", "Jobs that shared an engine batch with others (micro-batching)", registry=self.registry)
        merged.set_function(lambda: stats.merged_jobs)
        self.model_loads = Counter("sdfast_model_loads", "Models loaded on a request's demand, by model", ["model"], registry=self.registry)
        self.model_unloads = Counter("sdfast_model_unloads", "Models unloaded to keep the memory budget, by model", ["model"],
                                     registry=self.registry)
        self.model_load_seconds = Histogram("sdfast_model_load_seconds", "Time to load a model on demand", buckets=LOAD_BUCKETS,
                                            registry=self.registry)
        loaded = Gauge("sdfast_models_loaded", "Models loaded now", registry=self.registry)
        loaded.set_function(lambda: len(models.loaded))
        loaded_bytes = Gauge("sdfast_models_loaded_bytes", "Weights of the models loaded now, in bytes", registry=self.registry)
        loaded_bytes.set_function(lambda: sum(entry.weights_bytes for entry in models.loaded))

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_model_event(self, event: str, model: str, seconds: float) -> None:
        if event == "load":
            self.model_loads.labels(model).inc()
            self.model_load_seconds.observe(seconds)
        else:
            self.model_unloads.labels(model).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
