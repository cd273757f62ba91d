"""Export to, and import from, `transformers`' Kosmos-2 (`Kosmos2ForConditionalGeneration`).

`export_to_hf` writes a folder that stock `transformers` loads offline with no remote code:
`config.json`, safetensors weights (sharded when large), the XLM-RoBERTa tokenizer built over our
SentencePiece file (same ids as ours) and a `Kosmos2Processor` with our image size. `hf_to_checkpoint`
turns such a folder (ours, or a published Kosmos-2) into one of our checkpoint folders, the format
the trainer writes (`kosmos.train.checkpoint`) and everything reads (`kosmos.checkpoint`). Both write
into a hidden staging folder beside their output and rename it into place only when complete, so a
refusal or a crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from kosmos import config as config_io
from kosmos.convert.mapping import (
    ConversionError,
    check_exportable,
    from_hf_config,
    from_hf_state_dict,
    hf_vision_to_open_clip,
    to_hf_config,
    to_hf_state_dict,
)
from kosmos.model import KosmosModel, ModelConfig, load_model_config
from kosmos.tokenizer import SPECIAL_SYMBOLS, Tokenizer, TokenizerError

# The XLM-RoBERTa tokenizer's name for its SentencePiece file (as in the published Kosmos-2).
SENTENCEPIECE_FILE = "sentencepiece.bpe.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_free(out_dir: str | Path) -> None:
    """Refuse to write over anything: `out_dir` must not exist or be an empty folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"{out_dir} already exists and is not an empty folder; choose another")


@contextlib.contextmanager
def _written_atomically(out_dir: Path) -> Iterator[Path]:
    """A folder to fill, renamed to `out_dir` on success; on any failure nothing is left behind.

    It lies inside a hidden staging folder beside `out_dir` (DeepSpeed drops its recovery scripts
    beside the checkpoint folder it writes, and they must not land in the user's folder).
    """
    out_dir = Path(out_dir)
    check_free(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    folder = staging / out_dir.name
    folder.mkdir()
    try:
        yield folder
        _readable_as_umask_allows(folder)
        if out_dir.exists():
            out_dir.rmdir()
        folder.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _readable_as_umask_allows(folder: Path) -> None:
    """Give `folder` and what it holds the modes a plain `open` or `mkdir` would (0666 / 0777 less the
    umask): huggingface_hub writes its safetensors files 0600, which colleagues on a shared filesystem
    could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ----------------------------------------------------------------------------------------------
# Export


def build_processor(tokenizer_file: str | Path, image_size: int, num_image_tokens: int, folder: Path):
    """A `Kosmos2Processor` over our SentencePiece model, saved into (and loaded from) `folder`, that
    gives every image `num_image_tokens` slots when called plainly."""
    from transformers import CLIPImageProcessor, Kosmos2Processor, XLMRobertaTokenizer

    shutil.copyfile(tokenizer_file, folder / SENTENCEPIECE_FILE)
    # Built from the SentencePiece file (converted by `transformers`, which needs protobuf):
    # piece p gets id p + 1 and <mask> follows the pieces, as in our fairseq layout. The processor
    # reads its default number of image slots (otherwise 64) from the tokenizer's saved settings, so
    # `num_image_tokens` goes into tokenizer_config.json.
    tokenizer = XLMRobertaTokenizer.from_pretrained(folder, num_image_tokens=num_image_tokens)
    # CLIPImageProcessor's defaults are CLIP's: bicubic resize of the shorter side, centre crop,
    # OpenAI CLIP mean and std; only the size is ours.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # The processor appends </doc>, <image>, </image>, </chunk>, </line> after <mask>: our ids.
    processor = Kosmos2Processor(image_processor, tokenizer)
    processor.save_pretrained(folder)
    return processor


def _check_processor_ids(processor, tokenizer: Tokenizer) -> None:
    hf = processor.tokenizer
    wanted = {
        **tokenizer.special_ids,
        "<s>": tokenizer.bos_id,
        "<pad>": tokenizer.pad_id,
        "</s>": tokenizer.eos_id,
    }
    for symbol, ours in wanted.items():
        theirs = hf.convert_tokens_to_ids(symbol)
        if theirs != ours:
            raise ConversionError(f"the exported tokenizer gives {symbol} id {theirs}, ours is {ours}")


def export_to_hf(
    state: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write our model (its state dict and config) and tokenizer as a `transformers` Kosmos-2 folder."""
    from huggingface_hub import save_torch_state_dict
    from transformers import Kosmos2ForConditionalGeneration

    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = to_hf_config(model_cfg)
    config.dtype = dtype
    from tqdm import tqdm

    renamed = to_hf_state_dict(state)
    tensors = tqdm(renamed.items(), total=len(renamed), unit="tensor", desc="kosmos convert", disable=None)
    hf_state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors}
    with torch.device("meta"):
        expected = Kosmos2ForConditionalGeneration(config).state_dict()
    expected.pop("text_model.lm_head.weight")  # tied: transformers restores it from the embeddings
    _check_same_tensors(hf_state, expected, "transformers' Kosmos-2")

    out_dir = Path(out_dir)
    with _written_atomically(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_torch_state_dict(hf_state, tmp, max_shard_size=max_shard_size)
        processor = build_processor(
            tokenizer.model_file, model_cfg.vision.image_size, model_cfg.connector.num_queries, tmp
        )
        _check_processor_ids(processor, tokenizer)
    return out_dir


def _check_same_tensors(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ConversionError(
            f"the converted weights do not fit {what}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConversionError(
                f"{name} has shape {tuple(tensor.shape)}, {what} needs {tuple(expected[name].shape)}"
            )


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", **kwargs) -> Path:
    """`export_to_hf` of a run folder (its latest checkpoint) or a checkpoint folder, any ZeRO stage."""
    from kosmos.checkpoint import (
        MODEL_CONFIG,
        CheckpointError,
        load_model_from_checkpoint,
        resolve_checkpoint,
    )

    check_free(out_dir)
    try:
        folder = resolve_checkpoint(checkpoint)
        # Refuse what cannot be exported before spending time on consolidating the weights.
        check_exportable(load_model_config(folder / MODEL_CONFIG))
        model, tokenizer, model_cfg = load_model_from_checkpoint(folder)
    except (CheckpointError, TokenizerError) as error:
        raise ConversionError(str(error)) from None
    return export_to_hf(model.state_dict(), model_cfg, tokenizer, out_dir, dtype, **kwargs)


# ----------------------------------------------------------------------------------------------
# Import


def read_hf(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, Path]:
    """Our state dict, model config and SentencePiece file for a `transformers` Kosmos-2 folder."""
    from transformers import AutoTokenizer, Kosmos2Config, Kosmos2ForConditionalGeneration

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir} is not a transformers model folder (no config.json)")
    try:
        model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    except ValueError as error:
        raise ConversionError(f"{hf_dir}/config.json is not valid JSON: {error}") from None
    if model_type != Kosmos2Config.model_type:
        raise ConversionError(f"{hf_dir} holds a {model_type!r} model, not Kosmos-2")
    model_cfg = from_hf_config(Kosmos2Config.from_pretrained(hf_dir, local_files_only=True))

    sentencepiece = hf_dir / SENTENCEPIECE_FILE
    try:
        tokenizer = Tokenizer(sentencepiece)
    except TokenizerError as error:
        raise ConversionError(f"{error}; our tokenizer needs the folder's SentencePiece file") from None
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - the tokenizer files can be missing or damaged in many ways
        raise ConversionError(
            f"{hf_dir}: the tokenizer could not be loaded: {type(error).__name__}: {error}"
        ) from None
    for symbol in SPECIAL_SYMBOLS:
        if hf_tokenizer.convert_tokens_to_ids(symbol) != tokenizer.special_ids[symbol]:
            raise ConversionError(
                f"{hf_dir}: the tokenizer gives {symbol} id {hf_tokenizer.convert_tokens_to_ids(symbol)}, "
                f"our layout puts it at {tokenizer.special_ids[symbol]}"
            )

    model = _load_pretrained(Kosmos2ForConditionalGeneration, hf_dir, strict=True)
    state = from_hf_state_dict(model.state_dict())

    # A published Kosmos-2 has rows for its grounding tokens (<phrase>, <object>, <patch_index_*>...)
    # after ours; our tokenizer never produces them, and the trainer wants one row per token id.
    rows = state["embed_tokens.weight"].shape[0]
    if rows < tokenizer.vocab_size:
        raise ConversionError(
            f"{hf_dir}: {rows} token embeddings for a tokenizer of {tokenizer.vocab_size} ids"
        )
    if rows > tokenizer.vocab_size:
        print(
            f"dropping {rows - tokenizer.vocab_size} embedding rows of tokens our tokenizer never produces "
            f"(ids {tokenizer.vocab_size}..{rows - 1})",
            file=sys.stderr,
        )
        state["embed_tokens.weight"] = state["lm_head.weight"] = state["embed_tokens.weight"][
            : tokenizer.vocab_size
        ]
        model_cfg.text.vocab_size = tokenizer.vocab_size
    return state, model_cfg, sentencepiece


def _load_pretrained(cls, hf_dir: Path, strict: bool, **kwargs):
    """`cls.from_pretrained` in float32, offline, refusing weights it would have to invent (or, when
    strict, weights it would drop)."""
    try:
        model, info = cls.from_pretrained(
            hf_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True, **kwargs
        )
    except Exception as error:  # noqa: BLE001 - missing or damaged weight files fail in many ways
        raise ConversionError(
            f"{hf_dir}: the weights could not be loaded: {type(error).__name__}: {error}"
        ) from None
    problems = {"missing": sorted(info["missing_keys"])}
    if strict:
        problems["unexpected"] = sorted(info["unexpected_keys"])
    for kind, names in problems.items():
        if names:
            raise ConversionError(f"{hf_dir}: {len(names)} {kind} tensors, e.g. {', '.join(names[:3])}")
    return model


def save_checkpoint(
    state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, tokenizer_file: str | Path, out_dir: str | Path
) -> Path:
    """Write weights as one of our checkpoint folders: a DeepSpeed checkpoint plus model.yaml and
    tokenizer.model, which `load_model_from_checkpoint` and `train.init_from` read.

    Joins (or starts) a one-process group, as `kosmos train` does.
    """
    from kosmos.checkpoint import MODEL_CONFIG, TOKENIZER
    from kosmos.train.engine import init_distributed

    init_distributed()  # before DeepSpeed's first import: it picks the CPU accelerator there
    import deepspeed

    model = KosmosModel(model_cfg)
    model.load_state_dict(state, strict=True)
    # Plain SGD has no state: the checkpoint carries the weights and nothing a fresh run would drop.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    out_dir = Path(out_dir)
    with _written_atomically(out_dir) as tmp, contextlib.redirect_stdout(sys.stderr):
        # DeepSpeed writes the folder `tag` under `save_dir`: here, the staging folder's only child.
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
        config_io.dump(model_cfg, tmp / MODEL_CONFIG)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
    return out_dir


def hf_to_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """`read_hf` then `save_checkpoint`: a `transformers` Kosmos-2 folder as one of our checkpoints."""
    check_free(out_dir)
    state, model_cfg, sentencepiece = read_hf(hf_dir)
    return save_checkpoint(state, model_cfg, sentencepiece, out_dir)


# ----------------------------------------------------------------------------------------------
# CLIP vision weights in `transformers` format


def clip_from_hf(hf_dir: str | Path, out_file: str | Path) -> Path:
    """A `transformers` CLIP (or CLIP vision) folder's vision tower as an open_clip state dict file,
    which `model.vision.weights` loads."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ConversionError(f"{out_file}: the output is a .safetensors file")
    if out_file.exists():
        raise ConversionError(f"{out_file} already exists; choose another")
    try:
        config = CLIPVisionConfig.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{hf_dir} is not a transformers CLIP folder: {error}") from None
    # OpenAI's CLIP uses QuickGELU, which our tower hard-wires; a GELU tower would load without
    # complaint and give wrong features.
    if config.hidden_act != "quick_gelu":
        raise ConversionError(
            f"{hf_dir}: hidden_act is {config.hidden_act!r}; our CLIP tower uses quick_gelu"
        )
    if config.layer_norm_eps != 1e-5:
        raise ConversionError(
            f"{hf_dir}: layer_norm_eps is {config.layer_norm_eps}; our CLIP tower uses 1e-5"
        )
    # A CLIPModel folder also holds the text tower and projections, which are not wanted here.
    model = _load_pretrained(CLIPVisionModel, hf_dir, strict=False, config=config)
    tower = {k: v.contiguous() for k, v in hf_vision_to_open_clip(model.state_dict()).items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    try:
        save_file(tower, str(tmp))
        tmp.rename(out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(
        f"vision: width {config.hidden_size}, layers {config.num_hidden_layers}, heads "
        f"{config.num_attention_heads}, image_size {config.image_size}, patch_size {config.patch_size}",
        file=sys.stderr,
    )
    return out_file
