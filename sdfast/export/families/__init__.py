"""Model families on the export side: one module each (loader, wrappers, sample inputs, dimensions, manifest blocks),
named by the family's recipe (export/<family>.toml). The family comes from model_index.json's pipeline class, or
from --family."""
from __future__ import annotations

import importlib
from types import ModuleType

from sdfast.errors import ConfigError

FAMILIES = ("sd15", "sdxl", "sd3")  # the recipes in export/, one per family


def family_for_pipeline(pipeline_class: str | None, folder) -> str:
    """The family whose recipe exports ``pipeline_class`` (model_index.json's _class_name)."""
    from sdfast.export.recipe import Recipe

    known = {}
    for family in FAMILIES:
        for name in Recipe.load(family).data["pipeline_classes"]:
            known[name] = family
    if pipeline_class is None:
        raise ConfigError(f"'{folder}/model_index.json' names no pipeline class (_class_name); name the family with --family: "
                          f"{', '.join(FAMILIES)}")
    if pipeline_class not in known:
        raise ConfigError(f"'{folder}' holds a {pipeline_class}; sdfast exports {', '.join(known)} "
                          f"(or name the family with --family: {', '.join(FAMILIES)})")
    return known[pipeline_class]


def export_module(recipe) -> ModuleType:
    """The family's export module, as its recipe names it."""
    return importlib.import_module(f"sdfast.export.families.{recipe.data['export_module']}")
