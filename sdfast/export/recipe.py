"""Reads an export recipe (export/<family>.toml) and resolves its symbolic shapes for one export."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources

from sdfast.errors import ConfigError


def recipe_text(family: str) -> str:
    """The recipe's TOML, from the installed package (sdfast.recipes is the top-level export/ folder)."""
    try:
        return resources.files("sdfast.recipes").joinpath(f"{family}.toml").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        from sdfast.export.families import FAMILIES

        raise ConfigError(f"no export recipe for model family '{family}' (sdfast exports {', '.join(FAMILIES)})") from None


@dataclass(frozen=True)
class DynamicDim:
    """An axis left dynamic in the ONNX graph: any multiple of ``multiple_of``, up to ``max_multiple`` of them."""

    name: str
    multiple_of: int
    max_multiple: int
    trace_multiple: int  # the size the exporter traces with (not 1, or torch.export specializes the axis)
    parity_multiple: int  # the size the export-time parity check runs at

    def to_json(self) -> dict:
        return {"multiple_of": self.multiple_of, "min": self.multiple_of, "max": self.multiple_of * self.max_multiple}


@dataclass(frozen=True)
class ResolvedTensor:
    name: str
    shape: tuple[int | str, ...]  # a str is the name of a DynamicDim
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def concrete_shape(self, dynamic: dict[str, DynamicDim], purpose: str) -> tuple[int, ...]:
        """The shape with each dynamic axis at its 'trace' or 'parity' size."""
        return tuple(
            d if isinstance(d, int) else dynamic[d].multiple_of * getattr(dynamic[d], f"{purpose}_multiple") for d in self.shape
        )


@dataclass(frozen=True)
class ComponentRecipe:
    name: str
    inputs: tuple[ResolvedTensor, ...]
    outputs: tuple[ResolvedTensor, ...]
    tolerance: float
    dynamic: dict[str, DynamicDim]  # the dynamic axes this component's tensors use
    precision: str = "fp32"  # what this component is exported in (an fp16 export keeps some components fp32)
    keep_fp32_ops: tuple[str, ...] = ()  # op types that stay fp32 inside its fp16 graph
    whole_fp32_reason: str | None = None  # why an fp16 export keeps this component fp32
    ort_model_type: str | None = None  # onnxruntime transformer optimizer's model type, for GPU fusions
    role: str | None = None  # text_encoder, denoiser, vae_decoder or vae_encoder (the manifest's ROLES); the recipe says
    optional: bool = False  # an engine dir of the family may lack it


@dataclass(frozen=True)
class Recipe:
    family: str
    data: dict

    @classmethod
    def load(cls, family: str) -> "Recipe":
        try:
            return cls(family=family, data=tomllib.loads(recipe_text(family)))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"export recipe '{family}' is not valid TOML: {error}") from None

    @property
    def opset(self) -> int:
        return int(self.data["opset"])

    @property
    def latent_factor(self) -> int:
        return int(self.data["latent_factor"])

    @property
    def defaults(self) -> dict:
        return dict(self.data.get("defaults", {}))

    @property
    def component_names(self) -> list[str]:
        """The components ``sdfast export`` writes by default: every one but the adapters (ControlNets, added to an engine
        dir later) and those an export option asks for (``only_with``: the step cache's shallow U-Net)."""
        return [name for name, spec in self.data["components"].items() if not spec.get("adapter", False) and "only_with" not in spec]

    def asked_components(self, request) -> list[str]:
        """The components whose ``only_with`` export option ``request`` sets (``--step-cache``: the shallow U-Net)."""
        return [name for name, spec in self.data["components"].items() if getattr(request, spec.get("only_with", "-"), False)]

    def dynamic_dims(self, dims: dict[str, int]) -> dict[str, DynamicDim]:
        """The recipe's dynamic axes with their bounds resolved from ``dims``."""
        return {
            name: DynamicDim(
                name, int(dims[spec["multiple_of"]]), int(dims[spec["max_multiple"]]),
                int(spec["trace_multiple"]), int(spec["parity_multiple"]),
            )
            for name, spec in self.data.get("dynamic", {}).items()
        }

    def component(self, name: str, dims: dict[str, int], precision: str, fp16_safe: bool = False) -> ComponentRecipe:
        """One component with every static symbolic dimension replaced by its value from ``dims``.

        ``fp16_safe``: the family's module found this model's component safe in fp16 (the fp16-fix VAE), which lifts
        the recipe's fp16_whole_fp32 rule.
        """
        spec = self.data["components"][name]
        whole_fp32_reason = spec.get("fp16_whole_fp32") if precision == "fp16" and not fp16_safe else None
        if whole_fp32_reason:
            precision = "fp32"
        tolerance = spec.get("tolerance", {}).get(precision)
        if tolerance is None:
            raise ConfigError(f"recipe '{self.family}' has no {precision} parity tolerance for {name}")
        dynamic = self.dynamic_dims(dims)
        used = {}

        def resolve(tensors: list[dict]) -> tuple[ResolvedTensor, ...]:
            resolved = []
            for tensor in tensors:
                shape = []
                for d in tensor["shape"]:
                    if isinstance(d, str) and d in dynamic:
                        used[d] = dynamic[d]
                        shape.append(d)
                    else:
                        shape.append(d if isinstance(d, int) else dims[d])
                resolved.append(ResolvedTensor(tensor["name"], tuple(shape), tensor["dtype"]))
            return tuple(resolved)

        inputs, outputs = resolve(spec["inputs"]), resolve(spec["outputs"])
        # ControlNet residuals: a list the family module derives from the U-Net's blocks, [(name, (C, h, w)), ...]
        rows = spec.get("batch", "unet_batch")  # the batch of these listed tensors: the cond-only U-Net's is the images'
        inputs += residual_tensors(dims, spec.get("residual_inputs"), rows)
        outputs += residual_tensors(dims, spec.get("residual_outputs"), rows)
        # step caching: the U-Net's extra output, the shallow U-Net's extra input (none without --step-cache)
        inputs += residual_tensors(dims, spec.get("step_cache_inputs"), rows)
        outputs += residual_tensors(dims, spec.get("step_cache_outputs"), rows)
        return ComponentRecipe(
            name, inputs, outputs, float(tolerance), used, precision,
            tuple(spec.get("fp16_keep_fp32_ops", ())), whole_fp32_reason, spec.get("ort_model_type"), spec["role"],
            bool(spec.get("optional", False)),
        )


def residual_tensors(dims: dict, key: str | None, rows: str = "unet_batch") -> tuple[ResolvedTensor, ...]:
    """The tensors ``dims[key]`` lists (ControlNet residuals, the step cache's feature), each [dims[rows], C, h, w]
    float32; none when the key is unset."""
    if key is None:
        return ()
    return tuple(ResolvedTensor(name, (int(dims[rows]), *map(int, shape)), "float32") for name, shape in dims.get(key, ()))
