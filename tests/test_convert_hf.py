"""Export to and import from transformers' Kosmos-2, on real (tiny) DeepSpeed ZeRO-2 and ZeRO-3 runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kosmos import config as config_io
from kosmos.checkpoint import load_model_from_checkpoint, resolve_checkpoint
from kosmos.cli import main
from kosmos.convert import ConversionError, checkpoint_to_hf, export_to_hf
from kosmos.data import image_transform
from kosmos.model import KosmosModel, generate, load_model_config, pad_batch

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = object()  # stands for one image in encode_interleaved

# Runs in a fresh process (DeepSpeed needs a process group): the same randomised tiny model saved by
# the trainer's CheckpointManager under ZeRO-2 and under ZeRO-3, plus its plain state dict.
MAKE_RUNS = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from kosmos.model import KosmosModel, load_model_config
    from kosmos.train.checkpoint import CheckpointManager
    from kosmos.train.engine import init_distributed
    import deepspeed

    out, tokenizer, repo = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    init_distributed()
    cfg = load_model_config(out / "model.yaml")
    for stage in (2, 3):
        torch.manual_seed(0)
        model = KosmosModel(cfg)
        with torch.no_grad():  # every tensor distinct: a swapped name cannot hide behind ones and zeros
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        if stage == 2:
            torch.save(model.state_dict(), out / "reference.pt")
        config = json.loads((repo / f"kosmos/configs/deepspeed/zero{stage}.json").read_text())
        config["train_micro_batch_size_per_gpu"] = 1
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        manager = CheckpointManager(out / f"zero{stage}" / "checkpoints", keep=1, is_main=True)
        manager.save(engine, 1, {}, cfg, tokenizer)
    """
)


def _kosmos(*args):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, "-m", "kosmos", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_model_config(f"{REPO}/configs/model/tiny.yaml", [f"text.vocab_size={tokenizer.vocab_size}"])
    config_io.dump(cfg, out / "model.yaml")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, "-c", MAKE_RUNS, str(out), str(tokenizer.model_file), REPO],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    return checkpoint_to_hf(runs / "zero2", tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def models(runs, exported):
    ours, tokenizer, cfg = load_model_from_checkpoint(runs / "zero2")
    theirs = transformers.Kosmos2ForConditionalGeneration.from_pretrained(
        exported, dtype=torch.float32
    ).eval()
    return ours, theirs, tokenizer, cfg


def _prompts(tokenizer, q):
    return [
        tokenizer.encode_interleaved([IMAGE, "An image of"], q, eos=False),
        tokenizer.encode_interleaved(
            ["Here are", IMAGE, "and", IMAGE, "; which one is larger?"], q, eos=False
        ),
        tokenizer.encode_interleaved(["A prompt with no picture at all"], q, eos=False),
    ]


def _hf_inputs(batch):
    return {
        "input_ids": batch.input_ids,
        "attention_mask": (batch.segment_ids > 0).long(),
        "image_embeds_position_mask": batch.image_mask.long(),
    }


def test_exported_model_loads_cleanly(exported, runs):
    model, info = transformers.Kosmos2ForConditionalGeneration.from_pretrained(
        exported, output_loading_info=True
    )
    assert not any(info.values()), info
    cfg = load_model_config(runs / "model.yaml")
    assert model.config.latent_query_num == cfg.connector.num_queries
    assert not any(p.name.endswith(".partial") for p in exported.parent.iterdir())
    # Readable by whoever the umask lets read (the test process's is 022 or stricter).
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [exported, *exported.iterdir()]}
    assert modes == {p: (0o777 if p == exported.name else 0o666) & ~umask for p in modes}, modes


def test_logits_agree_with_one_and_several_images(models):
    ours, theirs, tokenizer, cfg = models
    prompts = _prompts(tokenizer, cfg.connector.num_queries)
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    for batch_prompts, batch_images in [
        (prompts[:1], images[:1]),
        (prompts[1:2], images[1:]),
        (prompts, images),
    ]:
        batch = pad_batch(batch_prompts, "left", images=batch_images)
        with torch.no_grad():
            expected = ours(**batch.inputs()).logits
            actual = theirs(pixel_values=batch_images, **_hf_inputs(batch)).logits
        real = batch.segment_ids > 0  # transformers leaves NaN at fully masked padding positions
        torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=1e-4)


def test_greedy_generations_are_equal(models):
    ours, theirs, tokenizer, cfg = models
    prompts = _prompts(tokenizer, cfg.connector.num_queries)
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    new_tokens = 12
    expected = generate(ours, prompts, images, max_new_tokens=new_tokens, strategy="greedy")
    # One prompt per call: transformers' Kosmos-2 counts left padding into the positions of the
    # tokens it generates, so a padded row would not decode as it does alone (ours does).
    actual = []
    for prompt, prompt_images in zip(prompts, (images[:1], images[1:], None)):
        inputs = _hf_inputs(pad_batch([prompt], "left"))
        if prompt_images is None:  # Kosmos-2's own generate insists on images
            inputs.pop("image_embeds_position_mask")
            model = theirs.text_model
        else:
            model, inputs["pixel_values"] = theirs, prompt_images
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        row = output[0, len(prompt) :].tolist()
        actual.append(row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row)
    assert actual == expected
    assert len({tuple(r) for r in expected}) == len(expected)  # the prompts really steer the model


def test_processor_gives_our_ids(exported, tokenizer):
    processor = transformers.AutoProcessor.from_pretrained(exported)
    q = json.loads((exported / "config.json").read_text())["latent_query_num"]
    gradient = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3).astype("uint8")
    picture = Image.fromarray(gradient)
    assert q == 16  # not the processor's default of 64: a plain call must give the model's number
    for text in ["An image of", "Question: what is shown here? Answer:"]:
        encoding = processor(text=text, images=picture)
        ours = tokenizer.encode_interleaved([picture, text], q, eos=False)
        assert encoding["input_ids"] == ours.ids
        assert encoding["image_embeds_position_mask"] == [int(m) for m in ours.image_mask]
        assert processor.tokenizer(text).input_ids == tokenizer.encode(text, bos=True, eos=True)
    for symbol, ours in tokenizer.special_ids.items():
        assert processor.tokenizer.convert_tokens_to_ids(symbol) == ours
    # Same CLIP preprocessing (size, crop, mean and std) on a smooth image of another aspect ratio.
    pixels = processor(text="x", images=picture, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, image_transform(pixels.shape[-1])(picture), atol=0.02, rtol=0)


def test_zero3_checkpoint_converts_like_zero2(runs, exported, tmp_path):
    from_zero3 = checkpoint_to_hf(runs / "zero3", tmp_path / "hf3")
    a, b = load_file(exported / "model.safetensors"), load_file(from_zero3 / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ours_to_hf_to_ours_is_identical(runs, exported, tmp_path):
    result = _kosmos("convert", "from-hf", str(exported), str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back"]  # no staging or DeepSpeed leftovers
    model, tokenizer, cfg = load_model_from_checkpoint(tmp_path / "back")
    reference = torch.load(runs / "reference.pt")
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    original = load_model_config(runs / "model.yaml")
    assert (cfg.text, cfg.connector) == (original.text, original.connector)
    # transformers has no notion of frozen blocks: the import keeps our default.
    assert dataclasses.replace(cfg.vision, trainable_blocks=original.vision.trainable_blocks) == original.vision
    assert tokenizer.model_file.read_bytes() == (exported / "sentencepiece.bpe.model").read_bytes()


def test_sharded_bfloat16_export_loads(models, tmp_path):
    ours, _, tokenizer, cfg = models
    out = export_to_hf(
        ours.state_dict(), cfg, tokenizer, tmp_path / "hf", dtype="bfloat16", max_shard_size="300KB"
    )
    assert (out / "model.safetensors.index.json").is_file()
    model, info = transformers.Kosmos2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16


def test_import_drops_rows_of_grounding_tokens(exported, tmp_path, tokenizer):
    # Like the published Kosmos-2: one embedding row per token of its processor, grounding tokens too.
    from kosmos.convert import read_hf

    folder = shutil.copytree(exported, tmp_path / "published")
    processor = transformers.AutoProcessor.from_pretrained(folder)
    config = transformers.Kosmos2Config.from_pretrained(folder)
    config.text_config.vocab_size = len(processor.tokenizer)
    assert config.text_config.vocab_size > tokenizer.vocab_size
    theirs = transformers.Kosmos2ForConditionalGeneration(config).eval()
    theirs.save_pretrained(folder)

    state, cfg, _ = read_hf(folder)
    assert cfg.text.vocab_size == tokenizer.vocab_size
    ours = KosmosModel(cfg).eval()
    ours.load_state_dict(state)
    prompt = tokenizer.encode_interleaved([IMAGE, "An image of"], cfg.connector.num_queries, eos=False)
    images = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    batch = pad_batch([prompt], "left", images=images)
    with torch.no_grad():
        expected = theirs(pixel_values=images, **_hf_inputs(batch)).logits[..., : tokenizer.vocab_size]
        torch.testing.assert_close(ours(**batch.inputs()).logits, expected, atol=1e-4, rtol=1e-4)


def _copy_checkpoint(runs, tmp_path):
    folder = tmp_path / "ckpt" / "step_1"
    shutil.copytree(resolve_checkpoint(runs / "zero2"), folder)
    return folder


def test_refuses_xpos_model(runs, tmp_path, capsys):
    folder = _copy_checkpoint(runs, tmp_path)
    cfg = load_model_config(folder / "model.yaml")
    cfg.text.positions = "xpos"
    config_io.dump(cfg, folder / "model.yaml")
    assert main(["convert", "to-hf", str(folder), str(tmp_path / "out")]) != 0
    assert "xpos" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_missing_and_corrupt_checkpoints(runs, tmp_path, capsys):
    assert main(["convert", "to-hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) != 0
    assert "nothing" in capsys.readouterr().err

    folder = _copy_checkpoint(runs, tmp_path)
    shard = next(folder.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["convert", "to-hf", str(folder), str(tmp_path / "out")]) != 0
    assert "could not be read" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_write_over_a_folder(runs, exported, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", "to-hf", str(runs / "zero2"), str(tmp_path / "out")]) != 0
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(tmp_path / "out"), str(tmp_path / "back")]) != 0
    assert "config.json" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("whole", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_clip_vision_tower_from_transformers(tmp_path, whole):
    vision = {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "quick_gelu",
    }
    if whole:  # a whole CLIP folder: text tower and projections too, which are left out
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        saved = transformers.CLIPModel(config).eval()
        clip = saved.vision_model
    else:
        clip = saved = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).eval()
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    saved.save_pretrained(tmp_path / "clip")
    assert main(["convert", "clip-from-hf", str(tmp_path / "clip"), str(tmp_path / "tower.safetensors")]) == 0

    cfg = load_model_config(
        f"{REPO}/configs/model/tiny.yaml", [f"vision.weights={tmp_path / 'tower.safetensors'}"]
    )
    ours = KosmosModel(cfg).vision.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = clip(pixel_values=images).last_hidden_state
        expected = torch.nn.functional.normalize(clip.post_layernorm(hidden), dim=-1)
        torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=1e-4)

    gelu = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**vision, "hidden_act": "gelu"}))
    gelu.save_pretrained(tmp_path / "gelu")
    with pytest.raises(ConversionError, match="quick_gelu"):
        from kosmos.convert import clip_from_hf

        clip_from_hf(tmp_path / "gelu", tmp_path / "gelu.safetensors")
    assert not (tmp_path / "gelu.safetensors").exists()


def test_generate_prints_only_the_generated_text(runs, models, exported, tmp_path, capsys):
    ours, theirs, tokenizer, cfg = models
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    picture.save(tmp_path / "a.png")
    # A fresh process: DeepSpeed's first import there decides where its log lines go.
    result = _kosmos(
        "generate",
        "--checkpoint",
        str(runs / "zero2"),
        "--image",
        str(tmp_path / "a.png"),
        "--prompt",
        "An image of",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prompt = tokenizer.encode_interleaved([picture, "An image of"], cfg.connector.num_queries, eos=False)
    images = image_transform(cfg.vision.image_size)(picture).unsqueeze(0)
    ids = generate(ours, [prompt], images, max_new_tokens=6)[0]
    assert result.stdout == tokenizer.decode(ids) + "\n"
    # The same through transformers, the processor called plainly: 16 image slots, the same tokens.
    processor = transformers.AutoProcessor.from_pretrained(exported)
    inputs = processor(text="An image of", images=picture, return_tensors="pt")
    assert int(inputs["image_embeds_position_mask"].sum()) == cfg.connector.num_queries == 16
    hf_ids = theirs.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    assert hf_ids[0, inputs["input_ids"].shape[1] :].tolist() == ids

    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(runs / "zero2"),
                "--image",
                str(tmp_path / "missing.png"),
                "--prompt",
                "x",
            ]
        )
        != 0
    )
    assert "missing.png" in capsys.readouterr().err
