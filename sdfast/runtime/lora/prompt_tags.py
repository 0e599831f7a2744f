"""A1111's extra-network tags: ``<lora:name:weight>`` in a prompt applies a LoRA and is removed from the text encoded."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdfast.errors import RequestError

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's modules/extra_networks.py re_extra_net
MAX_WEIGHT = 10.0  # A1111 takes any multiplier; beyond ±10 a LoRA gives noise, so a larger one is a typo


@dataclass(frozen=True)
class LoraUse:
    """One LoRA in a request: its name and multipliers for the text encoders and the U-Net (A1111's te and unet)."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0

    def weight_for(self, component: str) -> float:
        return self.te_weight if component.startswith("text_encoder") else self.unet_weight

    def tag(self) -> str:
        weights = f"{self.te_weight:g}" if self.te_weight == self.unet_weight else f"{self.te_weight:g}:{self.unet_weight:g}"
        return f"<lora:{self.name}:{weights}>"


def check_weight(value: str | float, field: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{field}: LoRA weight '{value}' is not a number") from None
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise RequestError(f"{field}: LoRA weight {value} is outside -{MAX_WEIGHT:g} .. {MAX_WEIGHT:g}")
    return weight


def parse_use(text: str, field: str) -> LoraUse:
    """``name``, ``name:weight`` or ``name:te_weight:unet_weight`` (also ``te=`` and ``unet=``), as A1111's tag arguments."""
    name, *arguments = [part.strip() for part in text.split(":")]
    if not name or not re.fullmatch(r"[^/\\<>:]+", name) or name in (".", ".."):
        raise RequestError(f"{field}: '{text}' does not name a LoRA (a file stem in the LoRA directory, not a path)")
    positional, named = [], {}
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals:
            if key.strip() not in ("te", "unet"):
                raise RequestError(f"{field}: LoRA argument '{key.strip()}' is not supported (te= and unet= are)")
            named[key.strip()] = check_weight(value, field)
        else:
            positional.append(check_weight(argument, field))
    if len(positional) > 2:
        raise RequestError(f"{field}: '{text}' has {len(positional)} weights; give one, or the text encoders' and the U-Net's")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else positional[0] if positional else te)
    return LoraUse(name, te, unet)


def extract_loras(prompt: str) -> tuple[str, list[LoraUse]]:
    """(the prompt without its tags, the LoRAs its ``<lora:...>`` tags name); other extra networks are refused by name."""
    uses: list[LoraUse] = []

    def take(match: re.Match) -> str:
        kind = match.group(1)
        if kind not in ("lora", "lyco"):
            raise RequestError(f"prompt: <{kind}:...> networks are not supported (LoRAs are: <lora:name:weight>)")
        uses.append(parse_use(match.group(2), "prompt"))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), uses
