"""Answer a prompt about audio files with a trained ORCA-DeSTA checkpoint (docs/serving.md).

    python -m orca_model.generate --model runs/qwen3-0.6b --audio a.wav --prompt "What is said?"

Each `--audio` is one request: the prompt with the file's audio, answered in one batch (several
files: several requests, the same prompt). The prompt gets the audio locator appended (" <|AUDIO|>",
as the training manifests' prompts) unless it holds one. `--model` is a directory written by
`DeSTA25AudioModel.save_pretrained` (a trainer's output directory also holds the processor's
files; without them the processor comes from the config's LLM and Whisper ids). Sampling follows
the reference (temperature 0.7, top-p 0.9); `--greedy` decodes greedily. Every file is decoded
once, before the model loads: one that cannot be read is reported with the reason and the command
exits with status 1; the requests carry the decoded audio to the model. A batch of one request
(one --audio, or --batch-size 1) streams its answer as it is generated; `--stats` prints where the
time went (encoder, ASR, time to first token, tokens per second) to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PROG = "python -m orca_model.generate"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (DeSTA25AudioModel.save_pretrained)")
    parser.add_argument("--audio", required=True, action="append", help="an audio file; repeat for a batch of requests")
    parser.add_argument("--prompt", required=True, help='the question, e.g. "What is said?"')
    parser.add_argument("--system-prompt", default=None, help="a system message before each request")
    parser.add_argument(
        "--transcription",
        action="append",
        default=None,
        help="the transcription of each --audio, in order (skips Whisper ASR); give one per --audio",
    )
    parser.add_argument(
        "--no-transcribe",
        action="store_true",
        help="no VAD or Whisper ASR: the prompt carries no transcription (as in training)",
    )
    parser.add_argument(
        "--no-audio-tags",
        action="store_true",
        help="leave out the <start_audio>/<end_audio> tags the reference's generate puts around each audio",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens per answer at most (default 512)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling, as the reference)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (reproducible sampling)")
    parser.add_argument(
        "--use-fused-orca",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the fused kernels, or the reference ops (default: the checkpoint's config)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="the LLM's dtype (default: the config's llm_dtype); Whisper stays fp32",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="requests per batch (default: all at once)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file: audio, transcription, answer")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print each batch's timings to stderr: encoder, ASR, time to first token, tokens/s",
    )
    args = parser.parse_args(argv)
    if args.transcription is not None and len(args.transcription) != len(args.audio):
        parser.error(f"{len(args.transcription)} --transcription for {len(args.audio)} --audio: give one per --audio")
    if args.max_new_tokens < 1 or args.batch_size < 0:
        parser.error("--max-new-tokens must be >= 1 and --batch-size >= 0")
    return args


def requests(args: argparse.Namespace, waveforms: dict[str, np.ndarray], locator: str, has_marker) -> list[list[dict]]:
    """One conversation per --audio: [system], the user's prompt with the audio, its entry carrying
    the file's decoded waveform (`waveforms[path]`)."""
    content = args.prompt if has_marker(args.prompt) else f"{args.prompt} {locator}"
    texts = args.transcription or [None] * len(args.audio)
    conversations = []
    for path, text in zip(args.audio, texts, strict=True):
        conversation = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        audio = {"audio": path, "text": text, "waveform": waveforms[path]}
        conversation.append({"role": "user", "content": content, "audios": [audio]})
        conversations.append(conversation)
    return conversations


def answer_streamer(tokenizer):
    """A `TextStreamer` (skipping the prompt and the special tokens) that prints each new token's
    text as soon as it decodes to whole characters; TextStreamer itself holds some text back to
    the next space (transformers 5.17: all of it), which would print the answer a word at a time
    or, without spaces, all at the end. Batch of one."""
    from transformers import TextStreamer

    class AnswerStreamer(TextStreamer):
        def put(self, value) -> None:
            if value.dim() > 1:
                if value.size(0) > 1:
                    raise ValueError("the answer streamer takes a batch of one request")
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                return
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)

    return AnswerStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        return _run(args)
    except (OSError, ValueError) as error:  # unreadable files, a bad checkpoint directory, bad messages
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers import set_seed

    from orca_model.modeling import DeSTA25AudioModel
    from orca_model.processing import DeSTA25Processor

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model '{args.model}' is not a directory")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(
            f"--model '{args.model}' has no config.json: pass a directory written by DeSTA25AudioModel.save_pretrained"
        )
    # The processor first: every file is decoded before the model loads, so a bad one fails fast
    # (load_audio names the file and the reason), and only once (a repeated path too): the
    # requests carry the waveforms to generate.
    processor = DeSTA25Processor.from_checkpoint(args.model)
    waveforms = {path: processor.load_audio(path) for path in dict.fromkeys(args.audio)}

    overrides = {}
    if args.use_fused_orca is not None:
        overrides["use_fused_orca"] = args.use_fused_orca
    if args.dtype is not None:
        overrides["llm_dtype"] = args.dtype
    if args.seed is not None:
        set_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = DeSTA25AudioModel.from_pretrained(args.model, **overrides).to(device).eval()
    model.processor = processor

    conversations = requests(
        args, waveforms, processor.audio_locator, lambda text: processor.count_audio_markers(text) > 0
    )
    options = {"do_sample": not args.greedy, "max_new_tokens": args.max_new_tokens}
    if not args.greedy:
        options |= {"temperature": args.temperature, "top_p": args.top_p}
    size = args.batch_size or len(conversations)
    for first in range(0, len(conversations), size):
        batch = conversations[first : first + size]
        paths = args.audio[first : first + size]
        # One request streams its answer as it is generated (text output; JSON needs it whole).
        stream = not args.json and len(batch) == 1
        extra = {"streamer": answer_streamer(processor.tokenizer)} if stream else {}
        if stream:
            print(f"[{paths[0]}]", flush=True)
        output = model.generate(
            batch, transcribe=not args.no_transcribe, audio_tags=not args.no_audio_tags, **options, **extra
        )
        for (path, transcription), answer in zip(output.audios, output.text, strict=True):
            if args.json:
                print(json.dumps({"audio": path, "transcription": transcription, "answer": answer}))
            elif stream:
                print(flush=True)  # the streamer ended the answer's line; the blank line between answers
            else:
                print(f"[{path}]\n{answer}\n")
        if args.stats:
            print(f"{PROG}: stats for {', '.join(paths)}: {output.stats.summary()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
