"""Serving from chat messages: `DeSTA25AudioModel.generate(messages)` and `python -m
orca_model.generate`, offline, on tiny checkpoints (tests/tiny_models.py `save_serving_checkpoints`:
a random Whisper with ASR files, Qwen3 and Llama LLMs whose greedy answers depend on the input)
and wav files written here (tones, silence, noise; 0.2 s to 30 s; mono and stereo; 8, 16 and
44.1 kHz). Greedy decoding throughout, on the reference ops except where fused and unfused are
compared."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from child_process import CHECKOUT, child_environment
from orca_model import DeSTA25AudioModel, modeling
from orca_model.generate import main as generate_main
from orca_model.processing import AUDIO_END, AUDIO_START, DeSTA25Processor
from orca_model.serving import (
    NAME,
    SAMPLING_DEFAULTS,
    EnergyVAD,
    GenerationOutput,
    WhisperTranscriber,
)
from tiny_models import save_serving_checkpoints, serving_desta_config
from tiny_tokenizer import LOCATOR, write_wav

NEW_TOKENS = 8
GREEDY = {"do_sample": False, "max_new_tokens": NEW_TOKENS}
# (name, seconds, rate, channels, kind)
FILES = [
    ("tone", 1.0, 16000, 1, "tone"),
    ("tone-long", 30.0, 44100, 2, "tone"),
    ("silence", 2.0, 8000, 1, "silence"),
    ("silence-long", 30.0, 16000, 2, "silence"),
    ("noise", 1.5, 44100, 2, "noise"),
    ("noise-8k", 3.0, 8000, 1, "noise"),
    ("short", 0.2, 16000, 1, "tone"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices run faster on one thread than on two contended ones; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def files(root) -> dict[str, str]:
    audio = root / "audio"
    audio.mkdir()
    paths = {}
    for index, (name, seconds, rate, channels, kind) in enumerate(FILES):
        paths[name] = str(audio / f"{name}.wav")
        write_wav(paths[name], seconds, rate=rate, channels=channels, kind=kind, seed=index)
    paths["corrupt"] = str(audio / "corrupt.wav")
    with open(paths["corrupt"], "wb") as file:
        file.write(b"RIFF\x24\x00\x00\x00WAVEnot really a wav file")
    paths["missing"] = str(audio / "missing.wav")
    return paths


@pytest.fixture(scope="module")
def checkpoints(root) -> dict[str, str]:
    return save_serving_checkpoints(str(root / "checkpoints"))


def build(checkpoints, kind: str = "qwen3", **overrides) -> DeSTA25AudioModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DeSTA25AudioModel(serving_desta_config(checkpoints, kind, **overrides)).eval()


@pytest.fixture(scope="module")
def model(checkpoints) -> DeSTA25AudioModel:
    return build(checkpoints)


def ask(path: str | None, prompt: str = "what is said?", text: str | None = None, system: str | None = None):
    """One conversation: [system], the user's prompt with `path` (none when None)."""
    conversation = [{"role": "system", "content": system}] if system else []
    if path is None:
        conversation.append({"role": "user", "content": prompt})
    else:
        audio = {"audio": path, "text": text}
        conversation.append({"role": "user", "content": f"{prompt} {LOCATOR}", "audios": [audio]})
    return conversation


def answer_tokens(model: DeSTA25AudioModel, ids: list[int]) -> list[int]:
    """A row of generated ids up to and including its first EOS (the padding after it dropped)."""
    eos = model.processor.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


class CountingTranscriber:
    def __init__(self, inner):
        self.inner, self.calls, self.audios = inner, 0, 0

    def __call__(self, features):
        self.calls += 1
        self.audios += features.size(0)
        return self.inner(features)


# ---------------------------------------------------------------------- generate(messages)


def test_generate_from_messages_returns_the_reference_fields_deterministically(model, files):
    conversation = ask(files["tone"])
    first = model.generate(conversation, **GREEDY)
    assert isinstance(first, GenerationOutput)
    assert model.generate(messages=conversation, **GREEDY) == first  # positional or keyword, same answer
    assert len(first.text) == len(first.generated_ids) == 1 and len(first.generated_ids[0]) <= NEW_TOKENS
    assert first.text == model.processor.tokenizer.batch_decode(first.generated_ids, skip_special_tokens=True)
    [(path, transcription)] = first.audios
    assert path == files["tone"] and transcription.strip() == transcription != ""  # Whisper's, stripped


def test_a_request_answers_the_same_alone_and_in_a_batch(model, files):
    """Prompts of different lengths (so different left padding), every kind of file, a given
    transcription, a system message and a request without audio, in one batch and each alone."""
    batch = [
        ask(files["tone-long"], "what is said in this rather long recording of a tone?"),
        ask(files["silence"], "hi"),
        ask(files["noise"], "and this?", text="some noise"),
        ask(None, "no audio at all"),
        ask(files["noise-8k"], "what?", system="answer briefly."),
    ]
    together = model.generate(batch, **GREEDY)
    transcriptions = [transcription for _, transcription in together.audios]
    assert [path for path, _ in together.audios] == [
        files[name] for name in ("tone-long", "silence", "noise", "noise-8k")
    ]
    assert transcriptions[1] == " " and transcriptions[2] == "some noise" and "" not in transcriptions
    alone = [model.generate(conversation, **GREEDY) for conversation in batch]
    for index, single in enumerate(alone):
        assert answer_tokens(model, single.generated_ids[0]) == answer_tokens(model, together.generated_ids[index])
        assert single.audios == [audio for audio in together.audios if audio[0] in str(batch[index])]
    assert len({tuple(ids) for ids in together.generated_ids}) > 1  # the answers depend on the request
    # ... and on its audio alone: the same prompt and transcription with another file.
    same_words = model.generate([ask(files[name], "what?", text="same") for name in ("tone", "noise")], **GREEDY)
    assert same_words.generated_ids[0] != same_words.generated_ids[1]
    # The same requests in the opposite order: each answer follows its request.
    backwards = model.generate(batch[::-1], **GREEDY)
    assert backwards.generated_ids == together.generated_ids[::-1]


def test_silence_is_not_transcribed_and_given_text_skips_the_asr_model(model, checkpoints, files, monkeypatch):
    whisper = model.transcriber
    idle = WhisperTranscriber(checkpoints["whisper"], model.perception.whisper)

    def no_asr():
        raise AssertionError("the ASR model was loaded or called")

    monkeypatch.setattr(idle, "load", no_asr)
    monkeypatch.setattr(model, "transcriber", idle)
    output = model.generate(
        [
            ask(files["silence"]),
            ask(files["silence-long"]),
            ask(files["tone"], text="a tone"),
            ask(files["short"]),
            ask(files["silence"], text="nothing"),
        ],
        **GREEDY,
    )
    # Silence (and a tone too short to be speech) -> the reference's " "; a given text is kept as
    # it is, also for a silent file (the reference would replace it by " ").
    assert [transcription for _, transcription in output.audios] == [" ", " ", "a tone", " ", "nothing"]

    # Audios with speech and no text: transcribed in one batched call, unless transcribe=False.
    counting = CountingTranscriber(whisper)
    monkeypatch.setattr(model, "transcriber", counting)
    output = model.generate([ask(files["tone"]), ask(files["silence"]), ask(files["noise"])], **GREEDY)
    assert (counting.calls, counting.audios) == (1, 2)
    assert output.audios[1][1] == " " and output.audios[0][1] and output.audios[2][1]
    output = model.generate([ask(files["tone"]), ask(files["noise"])], transcribe=False, **GREEDY)
    assert counting.calls == 1 and [text for _, text in output.audios] == ["", ""]


def test_the_vad_is_pluggable(model, files, monkeypatch):
    counting = CountingTranscriber(lambda features: ["x"] * features.size(0))
    monkeypatch.setattr(model, "transcriber", counting)
    heard = []
    monkeypatch.setattr(model, "vad", lambda wave: heard.append(wave.shape) or [])  # [] = no speech, as Silero
    output = model.generate([ask(files["tone"]), ask(files["noise"], text="given")], **GREEDY)
    assert heard == [(16000,)] and counting.calls == 0  # only the audio without text is checked
    assert [text for _, text in output.audios] == [" ", "given"]
    monkeypatch.setattr(model, "vad", None)  # no VAD: every audio without text is transcribed
    output = model.generate([ask(files["silence"])], **GREEDY)
    assert counting.calls == 1 and output.audios[0][1] == "x"
    with pytest.raises(TypeError, match="callable"):
        model.vad = "silero"


def test_energy_vad_threshold():
    vad = EnergyVAD()
    rate = 16000
    time = np.arange(rate, dtype=np.float32) / rate
    tone = lambda amplitude: (amplitude * np.sin(2 * np.pi * 440 * time)).astype(np.float32)
    assert not vad(np.zeros(rate, np.float32))
    assert vad(tone(0.5)) and vad(np.random.default_rng(0).uniform(-0.5, 0.5, rate).astype(np.float32))
    # -40 dBFS RMS is the threshold: a sine of amplitude a has RMS a / sqrt(2).
    assert vad(tone(0.011 * np.sqrt(2))) and not vad(tone(0.009 * np.sqrt(2)))
    # 0.25 s of loud frames at least.
    burst = np.zeros(rate, np.float32)
    burst[: int(0.3 * rate)] = 0.5
    assert vad(burst)
    burst[int(0.2 * rate) :] = 0
    assert not vad(burst) and not vad(np.zeros(0, np.float32))
    assert EnergyVAD(threshold_db=-60.0)(tone(0.005))
    with pytest.raises(ValueError, match="1-D"):
        vad(np.zeros((2, rate), np.float32))


def test_the_asr_model_shares_the_encoder(model, checkpoints, files):
    from transformers import WhisperForConditionalGeneration

    transcriber = WhisperTranscriber(checkpoints["whisper"], model.perception.whisper)
    processor = model.processor
    features = processor.features([processor.load_audio(files[name]) for name in ("tone", "noise")])
    keys = set(model.state_dict())
    parameters = sum(1 for _ in model.parameters())
    texts = transcriber(features)
    asr = transcriber.model
    assert asr.model.encoder is model.perception.whisper  # one encoder: the DeSTA model's
    assert set(model.state_dict()) == keys and sum(1 for _ in model.parameters()) == parameters
    # The same transcription as Whisper with its own (equal) encoder, bounded as the reference.
    whole = WhisperForConditionalGeneration.from_pretrained(checkpoints["whisper"]).eval()
    ids = whole.generate(input_features=features, max_new_tokens=whole.config.max_target_positions // 2)
    assert texts == [text.strip() for text in transcriber.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert all(texts)


def test_the_whisper_encoder_runs_once_per_request(model, files, monkeypatch):
    """One encoder pass over every audio of the request, read by the model's audio memory and by
    Whisper's decoder; the answers and transcriptions are those of the two separate passes."""
    encoder = model.perception.whisper
    passes, whole_encoder_calls = [], []
    hooks = [
        encoder.conv1.register_forward_hook(lambda module, args, output: passes.append(args[0].size(0))),
        encoder.register_forward_hook(lambda *args: whole_encoder_calls.append(1)),
    ]
    batch = [
        ask(files["tone"]),
        ask(files["noise"], "and this?"),
        ask(files["silence"]),
        ask(files["noise-8k"], text="given"),
    ]
    try:
        shared = model.generate(batch, **GREEDY)
        assert passes == [4] and whole_encoder_calls == []  # one pass, all four audios; none in the ASR
        passes.clear()
        whisper = model.transcriber
        monkeypatch.setattr(model, "transcriber", lambda features: whisper(features))  # runs its own encoder
        separate = model.generate(batch, **GREEDY)
        # The model's pass, then Whisper's own on the 2 transcribed audios: two of them (language
        # detection, then transcription), which the shared pass spares too.
        assert passes[0] == 4 and passes[1:] == [2] * len(whole_encoder_calls) and len(whole_encoder_calls) >= 1
    finally:
        for hook in hooks:
            hook.remove()
    assert shared == separate
    assert [text for _, text in shared.audios][2:] == [" ", "given"] and shared.audios[0][1] and shared.audios[1][1]
    stats = shared.stats
    assert (stats.audios, stats.transcribed, stats.answers) == (4, 2, 4)
    assert stats.encoder_s > 0 and stats.asr_s > 0 and stats.time_to_first_token_s <= stats.total_s
    assert stats.new_tokens == sum(len(answer_tokens(model, ids)) for ids in shared.generated_ids)


def test_the_model_core_does_not_import_the_serving_pipeline(model, files, monkeypatch):
    """orca_model.serving depends on orca_model.modeling, never the other way round: importing the
    model loads no serving module, modeling.py names none, and generate(messages) reaches the
    pipeline the package registered (here a stand-in) through the ChatPipeline protocol."""
    code = "import sys, orca_model.modeling; print(sorted(m for m in sys.modules if m.startswith('orca_model.')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], env=child_environment(), cwd=CHECKOUT, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "orca_model.modeling" in loaded.stdout and "orca_model.serving" not in loaded.stdout

    source = (CHECKOUT / "orca_model" / "modeling.py").read_text()
    assert "orca_model.serving" not in source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            assert not any("serving" in alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert "serving" not in (node.module or "") and not any(alias.name == "serving" for alias in node.names)
        elif isinstance(node, ast.Name):
            assert node.id != "serving"

    calls = []

    class StandIn:
        def generate(self, model, messages, **kwargs):
            calls.append((model, messages, kwargs))
            return "answered"

    monkeypatch.setattr(modeling, "_chat_pipeline_loader", None)
    monkeypatch.setattr(modeling, "_chat_pipeline", None)
    with pytest.raises(RuntimeError, match="no chat pipeline is registered"):
        model.generate(ask(files["tone"]))
    modeling.register_chat_pipeline(StandIn)
    conversation = ask(files["tone"])
    assert model.generate(conversation, max_new_tokens=3) == "answered"
    assert calls == [(model, conversation, {"max_new_tokens": 3})]


def test_fused_and_unfused_give_the_same_tokens(model, files):
    batch = [ask(files["tone"], "what is it?", text="a tone"), ask(files["noise"], "and this one?", text="noise")]
    unfused = model.generate(batch, **GREEDY)
    model.set_use_fused_orca(True)
    try:
        fused = model.generate(batch, **GREEDY)
    finally:
        model.set_use_fused_orca(False)
    assert fused.generated_ids == unfused.generated_ids


def test_llama(checkpoints, files):
    llama = build(checkpoints, "llama")
    llama.transcriber = lambda features: ["hello"] * features.size(0)
    batch = [ask(files["tone"], "what is said here?"), ask(files["noise-8k"], "and?")]
    together = llama.generate(batch, **GREEDY)
    assert [text for _, text in together.audios] == ["hello", "hello"]
    for index, conversation in enumerate(batch):
        single = llama.generate(conversation, **GREEDY)
        assert answer_tokens(llama, single.generated_ids[0]) == answer_tokens(llama, together.generated_ids[index])


# ---------------------------------------------------------------------- prompts and defaults


def reference_prompt_ids(processor: DeSTA25Processor, text: str, lengths: list[int]) -> tuple[list[int], list[int]]:
    """The reference generate's ids: wrap every locator in the tags, tokenize, replace each
    locator token by K + L placeholders, join the tokens into a string and tokenize it again."""
    tokenizer = processor.tokenizer
    tokens = tokenizer.tokenize(text.replace(LOCATOR, f"{AUDIO_START}{LOCATOR}{AUDIO_END}"))
    result, starts, lengths = [], [], list(lengths)
    for token in tokens:
        if token == LOCATOR:
            starts.append(len(result))
            result += [processor.placeholder_token] * (processor.num_audio_tokens + lengths.pop(0))
        else:
            result.append(token)
    return tokenizer.encode(tokenizer.convert_tokens_to_string(result), add_special_tokens=False), starts


def test_prompts_wrap_each_audio_in_the_reference_tags(model):
    processor = model.processor
    text = processor.apply_chat_template([{"role": "user", "content": f"what is said? {LOCATOR} now."}])
    ids, starts = processor.expand_prompt(text, [3], audio_tags=True)
    assert (ids, starts) == reference_prompt_ids(processor, text, [3])
    start, end = starts[0], starts[0] + processor.num_audio_tokens + 3
    assert (
        processor.tokenizer.decode(ids[start - 1 : end + 1])
        == AUDIO_START + processor.placeholder_token * (end - start) + AUDIO_END
    )
    # Without the tags: the training collator's prompt.
    assert processor.expand_prompt(text, [3]) == (ids[: start - 1] + ids[start:end] + ids[end + 1 :], [start - 1])


def test_generation_defaults(model, files, monkeypatch):
    seen = []

    def fake_generate(**kwargs):
        seen.append(kwargs)
        return torch.full((kwargs["inputs_embeds"].size(0), 2), model.processor.eos_token_id)

    monkeypatch.setattr(model.llm_model, "generate", fake_generate)
    model.generate(ask(files["tone"], text="hi"))
    assert {key: seen[-1][key] for key in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert SAMPLING_DEFAULTS == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 512}
    assert seen[-1]["pad_token_id"] == model.processor.pad_token_id
    model.generate(ask(files["tone"], text="hi"), do_sample=False, max_new_tokens=3)
    assert (seen[-1]["do_sample"], seen[-1]["temperature"], seen[-1]["top_p"], seen[-1]["max_new_tokens"]) == (
        False,
        None,
        None,
        3,
    )
    # The tensor path adds nothing: the LLM's own generation config decides.
    inputs = model.processor.prompt_inputs([model.processor.apply_chat_template(ask(files["tone"]))], [["hi"]])
    features = model.processor.features([model.processor.load_audio(files["tone"])])
    model.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        features,
        inputs["batch_transcription_ids"],
        inputs["batch_start_positions"],
    )
    assert set(seen[-1]) == {"inputs_embeds", "attention_mask"}


def test_the_processor_comes_from_the_checkpoint_or_the_config(model, checkpoints, root):
    directory = root / "with-processor"
    model.save_pretrained(directory)
    loaded = DeSTA25AudioModel.from_pretrained(directory)
    assert loaded.processor.tokenizer.name_or_path == checkpoints["qwen3"]  # from the config's LLM id
    saved = DeSTA25Processor.from_config(model.config)
    saved.save_pretrained(directory)
    loaded = DeSTA25AudioModel.from_pretrained(directory)
    assert loaded.processor.tokenizer.name_or_path == str(directory)  # the checkpoint's own files
    loaded.processor = saved
    assert loaded.processor is saved


# ---------------------------------------------------------------------- errors


MARKERS = f"in its content ({LOCATOR} locators or {AUDIO_START}…{AUDIO_END} blocks)"


@pytest.mark.parametrize(
    ("content", "audios", "message"),
    [
        (f"a {LOCATOR} and {LOCATOR}", 1, f"has 2 audio markers {MARKERS} but 1 audio in its 'audios' list"),
        ("no marker", 1, f"has 0 audio markers {MARKERS} but 1 audio in its 'audios' list"),
        (f"one {LOCATOR}", 0, f"has 1 audio marker {MARKERS} but 0 audios in its 'audios' list"),
        (
            f"{LOCATOR} {LOCATOR}",
            2,
            "conversation 0 has 2 audios, but the model takes at most one audio per conversation",
        ),
    ],
)
def test_markers_and_audios_must_match(model, files, content, audios, message):
    conversation = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": content, "audios": [{"audio": files["tone"]}] * audios},
    ]
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        model.generate(conversation, **GREEDY)
    if "marker" in message:
        assert f"{NAME}: conversation 0: message 1 (role 'user', content {content!r}) {message}" in str(error.value)


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("hi", "message 0 must be a dict, got str: 'hi'"),
        ({"role": 1, "content": "hi"}, "message 0 (role 1, content 'hi'): 'role' must be a string, got int"),
        ({"role": "user"}, "message 0 (role 'user', content None): 'content' must be a string, got NoneType"),
        (
            {"role": "user", "content": LOCATOR, "audios": "a.wav"},
            f"message 0 (role 'user', content '{LOCATOR}'): 'audios' must be a list, got str",
        ),
        (
            {"role": "user", "content": LOCATOR, "audios": [3]},
            f"""message 0 (role 'user', content '{LOCATOR}'): audios[0] must be {{"audio": path, "text": optional """
            "transcription} or a path, got 3",
        ),
        (
            {"role": "user", "content": LOCATOR, "audios": [""]},
            f"message 0 (role 'user', content '{LOCATOR}'): audios[0]['audio'] must be the audio path (a non-empty "
            "string or path-like), got ''",
        ),
        (
            {"role": "user", "content": LOCATOR, "audios": [{"audio": "a.wav", "text": 3}]},
            f"message 0 (role 'user', content '{LOCATOR}'): audios[0]['text'] (audio 'a.wav') must be a string or "
            "None, got int",
        ),
    ],
)
def test_malformed_messages_are_named(model, message, problem):
    with pytest.raises(ValueError, match=re.escape(f"{NAME}: conversation 1: {problem}")):
        model.generate([ask(None, "hi"), [message]], **GREEDY)


def test_a_given_waveform_is_used_instead_of_the_file(model, files):
    wave = model.processor.load_audio(files["tone"])
    from_file = model.generate(ask(files["tone"], text="a tone"), **GREEDY)
    for given in (wave, wave.astype(np.float64)):  # float64 becomes the float32 load_audio gives
        conversation = ask(files["missing"], text="a tone")
        conversation[-1]["audios"][0]["waveform"] = given
        output = model.generate(conversation, **GREEDY)
        assert output.generated_ids == from_file.generated_ids
        assert output.audios == [(files["missing"], "a tone")]  # the path is reported, never read


@pytest.mark.parametrize(
    ("waveform", "problem"),
    [
        (np.zeros((2, 1600), np.float32), "got an array of shape (2, 1600) and dtype float32"),
        (np.zeros(1600, np.int16), "got an array of shape (1600,) and dtype int16"),
        ([0.0] * 1600, "got list"),
    ],
)
def test_a_waveform_must_be_a_1d_float_array(model, files, waveform, problem):
    conversation = ask(files["tone"])
    conversation[-1]["audios"][0]["waveform"] = waveform
    entry = f"{NAME}: conversation 1: message 0 (role 'user', content 'what is said? {LOCATOR}'): audios[0]"
    expected = f"{entry}['waveform'] (audio {files['tone']!r}) must be a 1-D floating numpy array of 16 kHz samples, "
    with pytest.raises(ValueError, match=re.escape(expected + problem)):
        model.generate([ask(files["noise"]), conversation], **GREEDY)


@pytest.mark.parametrize(
    ("waveform", "problem"),
    [
        (np.zeros(0, np.float32), "holds no samples"),
        (np.array([0.0, np.nan, 0.1], np.float32), "holds non-finite samples (NaN or inf)"),
        (np.array([0.0, np.inf], np.float64), "holds non-finite samples (NaN or inf)"),
    ],
)
def test_a_waveform_must_hold_finite_samples(model, files, waveform, problem):
    conversation = ask(files["tone"])
    conversation[-1]["audios"][0]["waveform"] = waveform
    with pytest.raises(ValueError, match=re.escape(f"audios[0]['waveform'] (audio {files['tone']!r}) {problem}")):
        model.generate(conversation, **GREEDY)


@pytest.mark.parametrize("name", ["missing", "corrupt"])
def test_unreadable_files_are_named(model, files, name):
    error = FileNotFoundError if name == "missing" else ValueError
    with pytest.raises(error, match=files[name]):
        model.generate([ask(files["tone"]), ask(files[name])], **GREEDY)


def test_messages_and_tensors_do_not_mix(model, files):
    with pytest.raises(TypeError, match="alone"):
        model.generate(ask(files["tone"]), torch.ones(1, 3))
    with pytest.raises(TypeError, match="missing"):
        model.generate(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty list"):
        model.generate(messages=[])


# ---------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def checkpoint_dir(model, root) -> str:
    """The model saved as a checkpoint without processor files (the processor from the config)."""
    directory = str(root / "checkpoint")
    model.save_pretrained(directory)
    return directory


def test_command_answers_each_file(model, files, checkpoint_dir, capsys):
    paths = [files["tone"], files["silence"]]
    code = generate_main(
        ["--model", checkpoint_dir, "--prompt", "what is said?", "--greedy", "--max-new-tokens", str(NEW_TOKENS)]
        + [argument for path in paths for argument in ("--audio", path)]
        + ["--device", "cpu", "--no-use-fused-orca", "--json"]
    )
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = model.generate([ask(path) for path in paths], **GREEDY)
    assert [line["audio"] for line in printed] == paths
    assert [line["answer"] for line in printed] == expected.text
    assert [line["transcription"] for line in printed] == [text for _, text in expected.audios]

    code = generate_main(
        ["--model", checkpoint_dir, "--prompt", "what is said?", "--greedy", "--max-new-tokens", str(NEW_TOKENS)]
        + ["--audio", files["tone"], "--transcription", "a tone", "--batch-size", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"[{files['tone']}]\n")
    assert out.split("\n", 1)[1].rstrip("\n") == model.generate(ask(files["tone"], text="a tone"), **GREEDY).text[0]


def test_command_decodes_each_file_once(files, checkpoint_dir, capsys, monkeypatch):
    decoded = []
    load_audio = DeSTA25Processor.load_audio

    def counting_load_audio(processor, path):
        decoded.append(path)
        return load_audio(processor, path)

    monkeypatch.setattr(DeSTA25Processor, "load_audio", counting_load_audio)
    paths = [files["tone"], files["noise"], files["tone"]]
    code = generate_main(
        ["--model", checkpoint_dir, "--prompt", "what is said?", "--greedy", "--max-new-tokens", "2"]
        + [argument for path in paths for argument in ("--audio", path)]
        + ["--no-transcribe", "--device", "cpu", "--no-use-fused-orca", "--json"]
    )
    assert code == 0
    assert decoded == [files["tone"], files["noise"]]  # once before the model loads, none in generate
    assert [json.loads(line)["audio"] for line in capsys.readouterr().out.splitlines()] == paths


class StdoutRecorder:
    """sys.stdout for a test: each write with the number of LLM forward calls made before it."""

    def __init__(self, steps: list):
        self.steps, self.writes = steps, []

    def write(self, text: str) -> int:
        self.writes.append((text, len(self.steps)))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(text for text, _ in self.writes)


def test_command_streams_one_request_and_reports_its_speed(model, files, checkpoint_dir, capsys, monkeypatch):
    """One request: its answer is printed token by token as the LLM generates it (the same text
    as the answer printed whole); --stats reports the time to first token and tokens/s."""
    steps: list[int] = []
    load = DeSTA25AudioModel.from_pretrained

    def counting_load(directory, **overrides):
        loaded = load(directory, **overrides)
        loaded.llm_model.register_forward_hook(lambda *args: steps.append(1))
        return loaded

    monkeypatch.setattr(DeSTA25AudioModel, "from_pretrained", counting_load)
    recorder = StdoutRecorder(steps)
    monkeypatch.setattr(sys, "stdout", recorder)
    code = generate_main(
        ["--model", checkpoint_dir, "--prompt", "what is said?", "--greedy", "--max-new-tokens", str(NEW_TOKENS)]
        + ["--audio", files["noise"], "--device", "cpu", "--no-use-fused-orca", "--stats"]
    )
    monkeypatch.undo()
    assert code == 0
    answer = model.generate(ask(files["noise"]), **GREEDY).text[0]
    assert recorder.text() == f"[{files['noise']}]\n{answer}\n\n"  # the format of the answers printed whole
    assert len(answer) >= 2 and len(steps) == NEW_TOKENS  # one LLM call per new token (prefill, then decode)
    answer_writes = [count for text, count in recorder.writes if text.strip() and text.strip() != f"[{files['noise']}]"]
    # Printed while generating: the first piece after the first step, pieces after different steps.
    assert answer_writes[0] < NEW_TOKENS and len(set(answer_writes)) >= 2
    stats = capsys.readouterr().err
    assert re.search(r"time to first token \d+\.\d ms", stats) and re.search(r"\d+\.\d tokens/s", stats), stats


@pytest.mark.parametrize("name", ["missing", "corrupt"])
def test_command_names_a_bad_file(files, checkpoint_dir, capsys, name):
    code = generate_main(
        ["--model", checkpoint_dir, "--prompt", "hi", "--audio", files["tone"], "--audio", files[name]]
    )
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert files[name] in captured.err and "Traceback" not in captured.err
    assert ("does not exist" if name == "missing" else "cannot be decoded") in captured.err


def test_command_help(capsys):
    with pytest.raises(SystemExit) as exit_status:
        generate_main(["--help"])
    assert exit_status.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--audio", "--prompt", "--max-new-tokens", "--no-use-fused-orca", "--greedy", "--dtype"):
        assert flag in help_text
