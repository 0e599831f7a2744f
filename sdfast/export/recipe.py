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
        raise ConfigError(f"no export recipe for model family '{family}'") from None


@dataclass(frozen=True)
class ResolvedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ComponentRecipe:
    name: str
    inputs: tuple[ResolvedTensor, ...]
    outputs: tuple[ResolvedTensor, ...]
    tolerance: float


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
        return list(self.data["components"])

    def component(self, name: str, dims: dict[str, int], precision: str) -> ComponentRecipe:
        """One component with every symbolic dimension replaced by its value from ``dims``."""
        spec = self.data["components"][name]
        tolerance = spec.get("tolerance", {}).get(precision)
        if tolerance is None:
            raise ConfigError(f"recipe '{self.family}' has no {precision} parity tolerance for {name}")

        def resolve(tensors: list[dict]) -> tuple[ResolvedTensor, ...]:
            resolved = []
            for tensor in tensors:
                shape = tuple(d if isinstance(d, int) else dims[d] for d in tensor["shape"])
                resolved.append(ResolvedTensor(tensor["name"], shape, tensor["dtype"]))
            return tuple(resolved)

        return ComponentRecipe(name, resolve(spec["inputs"]), resolve(spec["outputs"]), float(tolerance))
