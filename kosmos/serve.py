"""`kosmos serve`: a local page to try a checkpoint: images, an interleaved prompt, the decoding
settings, and the generation (gradio, `pip install -e ".[serve]"`).

The prompt marks where each uploaded image goes with `<image>`, in upload order (`<image> An image
of`); a prompt without marks reads the images first. Generation goes through the same code and
settings as `kosmos generate` (greedy or beam search, max new tokens), and the page shows the
`kosmos generate` command that gives the same text. A file that is not a JPEG, PNG or WebP image, or
is over `--max-upload-mb`, is refused with a message naming it. The page needs no network: gradio's
analytics and share links are off, and its theme uses the system's fonts.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from kosmos.cli import FP32_HELP, positive_int
from kosmos.config import InputError
from kosmos.model.prompting import DEFAULT_MAX_NEW_TOKENS, Decoding

IMAGE_MARK = "<image>"
MAX_BEAMS = 8
MAX_NEW_TOKENS = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="a local page to try a checkpoint: images, an interleaved prompt, decoding settings (gradio)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=positive_int, default=7860, help="default 7860")
    serve.add_argument("--max-upload-mb", type=positive_int, default=16, help="largest image file (default 16)")
    serve.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    serve.add_argument("--fp32", action="store_true", help=FP32_HELP)
    serve.set_defaults(handler=_serve)


def interleave(prompt: str, images: list) -> list:
    """The prompt's parts in reading order: each `<image>` mark replaced by the next image; with no
    marks, the images first. Empty texts are left out."""
    pieces = prompt.split(IMAGE_MARK)
    if len(pieces) == 1:
        parts = [*images, prompt]
    elif len(pieces) - 1 != len(images):
        raise InputError(
            f"the prompt marks {len(pieces) - 1} images with {IMAGE_MARK}, but {len(images)} were uploaded"
        )
    else:
        parts = [pieces[0]]
        for image, text in zip(images, pieces[1:]):
            parts += [image, text]
    return [part for part in parts if not isinstance(part, str) or part.strip()]


def equivalent_command(checkpoint: str, prompt: str, names: list[str], decoding: Decoding) -> str:
    """The `kosmos generate` command line that continues the same prompt with the same settings."""
    command = ["kosmos", "generate", "--checkpoint", checkpoint]
    for part in interleave(prompt, names):
        command += ["--prompt", part] if part not in names else ["--image", part]
    return shlex.join(command + decoding.command_line())


def build_page(prompter, checkpoint: str, max_upload_bytes: int):
    """The gradio page around `prompter` (a `kosmos.model.prompting.Prompter`)."""
    import gradio as gr

    from kosmos.model.prompting import read_image_file

    def run(files, prompt, max_new_tokens, beams):
        paths = [Path(f if isinstance(f, str) else f.name) for f in files or []]
        decoding = Decoding(max_new_tokens=int(max_new_tokens), beams=int(beams))
        try:
            images = [read_image_file(path, max_upload_bytes) for path in paths]
            text = prompter.continue_prompt(interleave(prompt or "", images), decoding)
        except InputError as error:  # stays on the page until the next try
            return "", "", f"**Refused:** {error}"
        search = "greedy" if decoding.beams == 1 else f"beam search, {decoding.beams} beams"
        settings = (
            f"{search}, at most {decoding.max_new_tokens} new tokens; the same as\n"
            + equivalent_command(checkpoint, prompt or "", [p.name for p in paths], decoding)
        )
        return text, settings, ""

    with gr.Blocks(title="kosmos", analytics_enabled=False) as page:
        gr.Markdown(f"### kosmos: `{checkpoint}`\nMark where each image goes with `{IMAGE_MARK}`, in upload order.")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Images (JPEG, PNG or WebP)", file_count="multiple", type="filepath")
                prompt = gr.Textbox(label="Prompt", value=f"{IMAGE_MARK} An image of", lines=3)
                max_new_tokens = gr.Slider(
                    1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"
                )
                beams = gr.Slider(1, MAX_BEAMS, value=1, step=1, label="Beams (1: greedy)")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                refusal = gr.Markdown()
                generation = gr.Textbox(label="Generation", lines=4, interactive=False)
                settings = gr.Textbox(label="Settings", lines=3, interactive=False)
        button.click(run, [files, prompt, max_new_tokens, beams], [generation, settings, refusal])
    return page


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise InputError('kosmos serve needs gradio: pip install -e ".[serve]" from the clone') from None

    from kosmos.model.prompting import Prompter
    from kosmos.threads import configure_threads

    prompter = Prompter(args.checkpoint, args.device, args.fp32)
    configure_threads()
    page = build_page(prompter, args.checkpoint, args.max_upload_mb << 20)
    # The system's fonts: the default theme's come from the network.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue().launch(
        server_name=args.host, server_port=args.port, share=False, theme=theme, ssr_mode=False, show_error=True
    )
    return 0
