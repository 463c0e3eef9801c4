"""Read a run directory's model card (RUN/README.md) with huggingface_hub's own parser, as
the hub and `huggingface-cli upload` do, and check the metadata keys PEFT writes.

    ~/.venvs/golden/bin/python scripts/check_model_card.py RUN_DIR
"""
import sys
from pathlib import Path

from huggingface_hub import ModelCard

card = ModelCard.load(Path(sys.argv[1]) / "README.md")
data = card.data.to_dict()
assert data["library_name"] == "peft", data
assert data["pipeline_tag"] == "text-generation", data
assert "lora" in data["tags"] and "lora-train" in data["tags"], data
if "base_model" in data:
    assert f'base_model:adapter:{data["base_model"]}' in data["tags"], data
assert "![train and eval loss](loss_curve.svg)" in card.text
print({"ok": True, "metadata": data})
