import json

import pytest

from diffusers_moc import MoCConfig


def test_save_and_load_roundtrip(tmp_path):
    config = MoCConfig(top_k=3, local_window=2, anchor_own_shot=True, text_anchors="shot", causal=False)
    path = config.save_pretrained(tmp_path / "moc")
    assert path.endswith("moc_config.json")
    data = json.loads((tmp_path / "moc" / "moc_config.json").read_text())
    assert data["top_k"] == 3 and data["_class_name"] == "MoCConfig"
    assert MoCConfig.from_pretrained(tmp_path / "moc") == config


def test_from_pretrained_subfolder_and_missing_file(tmp_path):
    MoCConfig(top_k=1).save_pretrained(tmp_path / "sub")
    assert MoCConfig.from_pretrained(tmp_path, subfolder="sub").top_k == 1
    with pytest.raises(FileNotFoundError, match="no moc_config.json"):
        MoCConfig.from_pretrained(tmp_path)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown MoCConfig keys \['topk'\]"):
        MoCConfig.from_dict({"topk": 3})


def test_save_into_a_file_path_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        MoCConfig().save_pretrained(f)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(local_window=-1), "local_window"),
        (dict(block_size=0), "block_size"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(causal="yes"), "causal must be True or False"),
        (dict(anchor_own_shot=1), "anchor_own_shot must be True or False"),
        (dict(text_anchors="none"), "text_anchors must be one of"),
        (dict(route_by="tile"), "route_by must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(drop_off=1.5), r"drop_off must be a number in \[0, 1\]"),
        (dict(drop_in=-0.1), "drop_in must be a finite number >= 0"),
        (dict(drop_in=float("inf")), "drop_in must be a finite number >= 0"),
        (dict(drop_in=float("nan")), "drop_in must be a finite number >= 0"),
        (dict(drop_off=float("nan")), r"drop_off must be a number in \[0, 1\]"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoCConfig(**kwargs)


def test_replace_validates():
    assert MoCConfig().replace(top_k=9).top_k == 9
    with pytest.raises(ValueError, match="top_k"):
        MoCConfig().replace(top_k=-3)
