"""Export recipes, one TOML file per model family. Installed as package data under the name sdfast.recipes."""
