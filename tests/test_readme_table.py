"""The README's table of supported models is the one `supported_models_table()` generates, and its claims are tested."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import diffusers
import pytest

from diffusers_moc.core.apply import _registry, supported_models
from diffusers_moc.models_table import TABLE_COLUMNS, supported_models_table

sys.path.insert(0, os.path.dirname(__file__))
from _cp_worker import MODELS as CONTEXT_PARALLEL_TESTED  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- models-table:start -->", "<!-- models-table:end -->"


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_readme_table_is_the_generated_table():
    text = README.read_text(encoding="utf-8") if README.is_file() else ""
    if START not in text or END not in text:
        pytest.fail(
            f"README.md has no models table between {START} and {END}; paste "
            "`python -c 'from diffusers_moc import supported_models_table as t; print(t())'` there"
        )
    readme_table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert readme_table == supported_models_table().strip(), (
        "README.md's models table is out of date; regenerate it with diffusers_moc.supported_models_table()"
    )


def test_table_has_one_row_per_supported_model_with_its_processor():
    rows = _rows(supported_models_table())
    assert [row[0].strip("`") for row in rows] == supported_models()
    by_name = {cls.__name__: sup.processor.__name__ for cls, sup in _registry().items()}
    assert all(row[2].strip("`") == by_name[row[0].strip("`")] for row in rows)


def test_table_pipelines_exist_in_diffusers():
    for row in _rows(supported_models_table()):
        for pipeline in re.split(r",\s*", row[1]):
            assert hasattr(diffusers, pipeline), f"{pipeline} (row {row[0]}) is not a diffusers pipeline"


def test_context_parallel_column_claims_only_tested_models():
    column = TABLE_COLUMNS.index("Context parallel")
    claimed = {row[0].strip("`") for row in _rows(supported_models_table()) if row[column] == "Ulysses"}
    assert claimed == set(CONTEXT_PARALLEL_TESTED)


def test_pipeline_feature_columns_claim_only_the_wan_families():
    """Multi-shot, image start and LoRA training are diffusers-moc pipelines for Wan (tested in
    test_long_video_pipeline.py and test_training.py) and HunyuanVideo 1.5 (test_hunyuan_video15_pipeline.py:
    multi-shot text- and image-to-video); every other model says no."""
    from diffusers_moc.model_families import HUNYUAN_VIDEO15_FAMILIES, WAN_FAMILIES

    features = [TABLE_COLUMNS.index(c) for c in TABLE_COLUMNS if c.startswith(("Multi-shot", "Image", "LoRA"))]
    multi, image, lora = features
    tested = {
        "`WanTransformer3DModel`": {c: {f.title for f in WAN_FAMILIES.values()} for c in features},
        "`HunyuanVideo15Transformer3DModel`": {
            multi: {"HunyuanVideo 1.5 T2V", "HunyuanVideo 1.5 I2V"},
            image: {"HunyuanVideo 1.5 I2V"},
            lora: {f.title for f in HUNYUAN_VIDEO15_FAMILIES.values() if f.trainable},
        },
    }
    for row in _rows(supported_models_table()):
        for column in features:
            allowed = tested.get(row[0], {}).get(column, set())
            if row[column] != "no" or allowed:
                assert row[column] != "no" and set(row[column].split(", ")) <= allowed, (row[0], row[column])
