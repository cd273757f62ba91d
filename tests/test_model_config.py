import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from open_clip.transformer import VisionTransformer

from kosmos.config import ConfigError
from kosmos.model import KosmosModel, VisionConfig, VisionWeightsError, load_model_config, load_vision_weights
from kosmos.model.vision import VisionEncoder


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("text:\n  layers: 2\n  widht: 64\n")
    with pytest.raises(ConfigError, match=r"text\.widht: unknown key"):
        load_model_config(path)


@pytest.mark.parametrize(
    "override, key",
    [("text.layers=two", "text.layers"), ("vision.trainable_blocks=9", "vision.trainable_blocks"),
     ("text.positions=rope", "text.positions"), ("connector.num_queries=1.5", "connector.num_queries")],
)
def test_bad_value_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_model_config(REPO / "configs/model/tiny.yaml", [override])


def test_cli_reports_config_error_and_fails(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("vision:\n  layers: true\n")
    result = subprocess.run([sys.executable, "-m", "kosmos", "model", "summary", "--config", str(path)],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "vision.layers" in result.stderr


def test_paper_summary_counts():
    result = subprocess.run(
        [sys.executable, "-m", "kosmos", "model", "summary", "--config", str(REPO / "configs/model/kosmos1.yaml"),
         "--json"], capture_output=True, text=True, check=True)
    counts = json.loads(result.stdout)
    assert set(counts) == {"total", "trainable", "language", "vision", "vision_trainable", "connector"}
    assert all(isinstance(v, int) for v in counts.values())
    with torch.device("meta"):
        vit_l = VisionTransformer(image_size=224, patch_size=14, width=1024, layers=1, heads=16, mlp_ratio=4.0)
    assert counts["vision_trainable"] == sum(p.numel() for p in vit_l.transformer.resblocks[0].parameters())
    assert 1.25e9 < counts["language"] < 1.4e9 and 1.55e9 < counts["total"] < 1.7e9
    assert counts["total"] == counts["language"] + counts["vision"] + counts["connector"]
    assert counts["trainable"] == counts["language"] + counts["vision_trainable"] + counts["connector"]


def _tiny_vision(**kw):
    return VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, **kw)


@pytest.mark.parametrize("prefix", ["", "visual."])
def test_vision_weights_load_from_file(tmp_path, prefix):
    source = VisionEncoder(_tiny_vision())
    state = {prefix + k: v for k, v in source.tower.state_dict().items()}
    if prefix:  # a whole CLIP checkpoint also holds the text tower and the projection
        state["visual.proj"] = torch.zeros(64, 32)
        state["token_embedding.weight"] = torch.zeros(10, 32)
    torch.save(state, tmp_path / "clip.pt")
    loaded = VisionEncoder(_tiny_vision(weights=str(tmp_path / "clip.pt")))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), source(images))
    assert torch.allclose(loaded(images).norm(dim=-1), torch.ones(2, 17))


def test_vision_weights_errors_name_the_file(tmp_path):
    tower = VisionEncoder(_tiny_vision()).tower
    with pytest.raises(VisionWeightsError, match="missing.pt"):
        load_vision_weights(tower, tmp_path / "missing.pt")
    wider = VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=96, layers=2, heads=2)).tower
    torch.save(wider.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(VisionWeightsError, match=r"wide\.pt.*shape"):
        load_vision_weights(tower, tmp_path / "wide.pt")
    torch.save({"conv1.weight": tower.conv1.weight}, tmp_path / "partial.pt")
    with pytest.raises(VisionWeightsError, match=r"partial\.pt lack"):
        load_vision_weights(tower, tmp_path / "partial.pt")


def test_model_uses_configured_weights(tmp_path, tiny_config):
    source = VisionEncoder(tiny_config.vision)
    torch.save(source.tower.state_dict(), tmp_path / "tower.pt")
    tiny_config.vision.weights = str(tmp_path / "tower.pt")
    model = KosmosModel(tiny_config)
    assert torch.equal(model.vision.tower.conv1.weight, source.tower.conv1.weight)
