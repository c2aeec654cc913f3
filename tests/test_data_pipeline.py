"""The data pipeline: DeSTA25Processor (audio loading, features, prompt expansion), ManifestDataset
and DeSTA25Collator, offline with the tiny tokenizer (tests/tiny_tokenizer.py) and a small
Whisper feature extractor ([N, 16, 100] features)."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly
from transformers import WhisperFeatureExtractor

from benchmarks import model_configs
from orca_model import DeSTA25Config
from orca_model.data import IGNORE_INDEX, DeSTA25Collator, ManifestDataset
from orca_model.processing import AUDIO_END, AUDIO_START, ChatAudio, DeSTA25Processor
from tiny_tokenizer import LOCATOR, PLACEHOLDER, build_tiny_tokenizer, save_tiny_tokenizer, write_wav

K = 4  # global audio tokens
MELS, FRAMES = 16, 100


def feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=MELS, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)


def make_processor(tokenizer=None, **kwargs) -> DeSTA25Processor:
    fields = {"num_audio_tokens": K, "placeholder_token": PLACEHOLDER} | kwargs
    return DeSTA25Processor(tokenizer or build_tiny_tokenizer(), feature_extractor(), **fields)


@pytest.fixture
def processor() -> DeSTA25Processor:
    return make_processor()


def encode(processor: DeSTA25Processor, text: str) -> list[int]:
    return processor.tokenizer.encode(text, add_special_tokens=False)


def user_prompt(processor: DeSTA25Processor, content: str, system: str | None = None) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], system_prompt=system)


# ---------------------------------------------------------------------- processor set-up


def test_processor_prepares_the_tokenizer_as_the_reference():
    tokenizer = build_tiny_tokenizer(with_locator=False)
    assert LOCATOR not in tokenizer.get_vocab()
    processor = make_processor(tokenizer)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert encode(processor, f"a{LOCATOR}b") == [
        *encode(processor, "a"),
        processor.audio_locator_id,
        *encode(processor, "b"),
    ]
    assert processor.placeholder_id == tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    # A pad token the tokenizer has is kept.
    assert make_processor(build_tiny_tokenizer(pad_token="<|endoftext|>")).pad_token_id == 0


def test_placeholder_and_locator_must_be_single_tokens():
    with pytest.raises(
        ValueError, match=re.escape("placeholder_token '<|reserved_special_token_87|>' must be one token")
    ):
        make_processor(placeholder_token="<|reserved_special_token_87|>")
    # Added as a token, but the tokenizer splits the special token out of it first.
    with pytest.raises(ValueError, match=re.escape("audio_locator '<|im_end|><|AUDIO2|>' must be one token")):
        make_processor(audio_locator="<|im_end|><|AUDIO2|>")
    with pytest.raises(ValueError, match="num_audio_tokens must be an int >= 1"):
        make_processor(num_audio_tokens=0)
    at_8k = feature_extractor()
    at_8k.sampling_rate = 8000
    with pytest.raises(ValueError, match="feature_extractor must work at 16000 Hz"):
        DeSTA25Processor(build_tiny_tokenizer(), at_8k, num_audio_tokens=K, placeholder_token=PLACEHOLDER)


def test_save_pretrained_round_trip(tmp_path, processor):
    processor.save_pretrained(tmp_path / "processor")
    loaded = DeSTA25Processor.from_pretrained(tmp_path / "processor")
    assert (loaded.audio_locator, loaded.placeholder_token, loaded.num_audio_tokens) == (LOCATOR, PLACEHOLDER, K)
    assert (loaded.tokenizer.padding_side, loaded.pad_token_id) == ("left", processor.pad_token_id)
    text = user_prompt(processor, f"what is said? {LOCATOR}", system="be brief.")
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == user_prompt(processor, "x")
    assert loaded.expand_prompt(text, [3]) == processor.expand_prompt(text, [3])
    wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    torch.testing.assert_close(loaded.features([wave]), processor.features([wave]))
    with pytest.raises(FileNotFoundError, match="has no desta25_processor.json"):
        DeSTA25Processor.from_pretrained(tmp_path)


def test_from_config(tmp_path):
    feature_extractor().save_pretrained(tmp_path / "whisper")
    config = DeSTA25Config(
        llm_model_id=save_tiny_tokenizer(tmp_path / "llm"),
        encoder_model_id=str(tmp_path / "whisper"),
        llm_config=model_configs.tiny_qwen3(),
        encoder_config=model_configs.tiny_whisper(),
        placeholder_token=PLACEHOLDER,
        orca_global_num_tokens=3,
    )
    processor = DeSTA25Processor.from_config(config)
    assert (processor.audio_locator, processor.placeholder_token, processor.num_audio_tokens) == (
        LOCATOR,
        PLACEHOLDER,
        3,
    )
    assert processor.features([np.zeros(1600, np.float32)]).shape == (1, MELS, FRAMES)
    given = build_tiny_tokenizer()
    assert DeSTA25Processor.from_config(config, tokenizer=given).tokenizer is given


# ---------------------------------------------------------------------- prompt expansion


def test_expand_locators(processor):
    text = user_prompt(processor, f"what is said? {LOCATOR} and {LOCATOR}.", system="listen.")
    ids, starts = processor.expand_prompt(text, [3, 0])
    first, middle, last = text.split(LOCATOR)
    placeholder = processor.placeholder_id
    expected = encode(processor, first) + [placeholder] * (K + 3) + encode(processor, middle) + [placeholder] * K
    assert starts == [len(encode(processor, first)), len(expected) - K]
    assert ids == expected + encode(processor, last)
    assert ids.count(placeholder) == 2 * K + 3


def test_expand_start_end_blocks(processor):
    content = f"one {AUDIO_START}{LOCATOR}{AUDIO_END}, two {AUDIO_START}\nclip\n{AUDIO_END} and {LOCATOR}!"
    text = user_prompt(processor, content)
    assert processor.count_audio_markers(text) == 3
    ids, starts = processor.expand_prompt(text, [2, 1, 0])
    placeholder = processor.placeholder_id
    prefix, rest = text.split(AUDIO_START, 1)
    # The whole block, tags included, becomes the audio's placeholders.
    expected = encode(processor, prefix) + [placeholder] * (K + 2) + encode(processor, ", two ")
    expected += [placeholder] * (K + 1) + encode(processor, " and ") + [placeholder] * K
    expected += encode(processor, text.rsplit(LOCATOR, 1)[1])
    assert ids == expected
    for start, length in zip(starts, [2, 1, 0], strict=True):
        assert ids[start - 1] != placeholder and ids[start : start + K + length] == [placeholder] * (K + length)
    tags = processor.tokenizer.convert_tokens_to_ids([AUDIO_START, AUDIO_END])
    assert not set(tags) & set(ids)


def test_marker_count_must_match_the_audios(processor):
    text = user_prompt(processor, f"{LOCATOR} vs {LOCATOR}")
    with pytest.raises(ValueError, match=re.escape("the prompt has 2 audio markers (<|AUDIO|> locators or")):
        processor.expand_prompt(text, [0])
    with pytest.raises(ValueError, match="but 1 audios"):
        processor.expand_prompt(user_prompt(processor, "no audio"), [0])
    with pytest.raises(ValueError, match=re.escape("transcription_lengths[1] must be an int >= 0")):
        processor.expand_prompt(text, [0, -1])


def test_conversation_audios_accepts_the_chat_format(tmp_path, processor):
    messages = [
        {"role": "system", "content": "listen."},
        {
            "role": "user",
            "content": f"{AUDIO_START}\nclip\n{AUDIO_END} then {LOCATOR}",
            "audios": [{"audio": "a.wav", "text": "hi"}, tmp_path / "b.wav"],  # a bare path, path-like
        },
        {"role": "assistant", "content": "ok.", "audios": None},
        {"role": "user", "content": f"and {AUDIO_START}{LOCATOR}{AUDIO_END}?", "audios": ("c.wav",)},
    ]
    assert processor.conversation_audios(messages, "here") == [
        ChatAudio("a.wav", "hi"),
        ChatAudio(str(tmp_path / "b.wav"), None),
        ChatAudio("c.wav", None),
    ]
    # A decoded waveform is serving's: without `waveforms` the key is ignored, as any other.
    entry = {"audio": "a.wav", "waveform": [0.5, "not checked"], "speaker": "ignored"}
    conversation = [{"role": "user", "content": LOCATOR, "audios": [entry]}]
    assert processor.conversation_audios(conversation, "here") == [ChatAudio("a.wav", None)]
    entry["waveform"] = np.linspace(-0.5, 0.5, 1600)  # float64 -> float32
    [audio] = processor.conversation_audios(conversation, "here", waveforms=True)
    assert audio.waveform.dtype == np.float32 and audio.waveform.shape == (1600,)
    np.testing.assert_array_equal(audio.waveform, entry["waveform"].astype(np.float32))


def test_transcription_ids(processor):
    ids = processor.transcription_ids("hello")
    assert ids.dtype == torch.long and ids.tolist() == [encode(processor, "hello")]
    assert processor.transcription_ids("").shape == (1, 0)


def test_prompt_inputs_left_pad_and_shift_starts(processor):
    texts = [user_prompt(processor, f"a {LOCATOR}"), user_prompt(processor, f"a longer question: {LOCATOR}?")]
    inputs = processor.prompt_inputs(texts, [["hi"], [""]])
    rows = [processor.expand_prompt(texts[0], [2])[0], processor.expand_prompt(texts[1], [0])[0]]
    pad = inputs["input_ids"].size(1) - len(rows[0])
    assert pad > 0 and inputs["input_ids"][1].tolist() == rows[1]
    assert inputs["input_ids"][0].tolist() == [processor.pad_token_id] * pad + rows[0]
    assert inputs["attention_mask"][0].tolist() == [0] * pad + [1] * len(rows[0])
    assert [ids.shape for ids in inputs["batch_transcription_ids"]] == [(1, 2), (1, 0)]
    for (row, start), length in zip(inputs["batch_start_positions"], [2, 0], strict=True):
        span = inputs["input_ids"][row, start : start + K + length]
        assert (span == processor.placeholder_id).all() and inputs["input_ids"][
            row, start - 1
        ] != processor.placeholder_id


# ---------------------------------------------------------------------- audio


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_load_audio_resamples_to_16k(tmp_path, processor, rate):
    path = tmp_path / f"tone_{rate}.wav"
    written = write_wav(path, 0.25, rate=rate, subtype="FLOAT")[:, 0]
    audio = processor.load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (math.ceil(len(written) * 16000 / rate),)
    if rate == 16000:
        np.testing.assert_array_equal(audio, written)
    # The 440 Hz tone at 16 kHz, away from the edges the filter sees as a step.
    time = np.arange(len(audio)) / 16000
    np.testing.assert_allclose(audio[200:-200], 0.5 * np.sin(2 * np.pi * 440 * time[200:-200]), atol=2e-3)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_load_audio_averages_the_channels(tmp_path, processor, rate):
    path = tmp_path / "stereo.wav"
    written = write_wav(path, 0.2, rate=rate, channels=2, kind="noise", seed=1, subtype="FLOAT")
    mono = written.mean(axis=1)
    if rate != 16000:
        mono = resample_poly(mono, 160, 441)
    np.testing.assert_allclose(processor.load_audio(path), mono, rtol=0, atol=1e-6)


def test_load_audio_flac_and_pcm16(tmp_path, processor):
    written = write_wav(tmp_path / "a.wav", 0.1, kind="noise")
    # The same 16-bit samples, losslessly in FLAC.
    soundfile.write(tmp_path / "a.flac", soundfile.read(tmp_path / "a.wav", dtype="int16")[0], 16000)
    wav, flac = processor.load_audio(tmp_path / "a.wav"), processor.load_audio(tmp_path / "a.flac")
    np.testing.assert_array_equal(wav, flac)
    np.testing.assert_allclose(wav, written[:, 0], atol=1 / 32767)


def test_load_audio_errors_name_the_file(tmp_path, processor):
    with pytest.raises(FileNotFoundError, match=re.escape(f"audio file '{tmp_path / 'missing.wav'}' does not exist")):
        processor.load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "x.wav"
    corrupt.write_bytes(b"definitely not audio" * 50)
    with pytest.raises(ValueError, match=re.escape(f"audio file '{corrupt}' cannot be decoded: ")):
        processor.load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(ValueError, match=re.escape(f"audio file '{empty}' holds no samples")):
        processor.load_audio(empty)


def test_features_are_the_feature_extractors(processor):
    waves = [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate([800, 16000, 20000])]
    features = processor.features(waves)
    assert features.shape == (3, MELS, FRAMES) and features.dtype == torch.float32
    expected = feature_extractor()(waves, sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="at least one waveform"):
        processor.features([])
    with pytest.raises(ValueError, match=re.escape("waveforms[0] must be 1-D")):
        processor.features([np.zeros((2, 100), np.float32)])


# ---------------------------------------------------------------------- collator


def item(processor, content: str, transcriptions: list[str], response: str, seconds: float = 0.3) -> dict:
    """A dataset item of one user message: one uniform-noise clip per transcription."""
    rng = np.random.default_rng(len(content))
    return {
        "waveforms": [rng.uniform(-0.5, 0.5, int(16000 * seconds)).astype(np.float32) for _ in transcriptions],
        "transcriptions": transcriptions,
        "audio_paths": [f"clip{i}.wav" for i in range(len(transcriptions))],
        "context": user_prompt(processor, content),
        "response": response,
    }


def reference_context(text: str, sizes: list[int]) -> str:
    """The reference's context string: its <start_audio>…<end_audio> blocks (when it has any,
    else its locators) replaced by `sizes[i]` placeholder strings."""
    blocks = re.search(f"{re.escape(AUDIO_START)}.*?{re.escape(AUDIO_END)}", text, re.S)
    pattern = f"{re.escape(AUDIO_START)}.*?{re.escape(AUDIO_END)}" if blocks else re.escape(LOCATOR)
    sizes = iter(sizes)
    return re.sub(pattern, lambda _: PLACEHOLDER * next(sizes), text, flags=re.S)


def reference_batch(processor, items, max_seq_length):
    """The reference's way: markers replaced by placeholder strings, `context + response + eos`
    tokenized jointly (right truncation, left padding), labels from len(tokenize(context)) on."""
    tokenizer = processor.tokenizer
    contexts = [
        reference_context(entry["context"], [K + len(encode(processor, text)) for text in entry["transcriptions"]])
        for entry in items
    ]
    joint = tokenizer(
        [context + entry["response"] + tokenizer.eos_token for context, entry in zip(contexts, items, strict=True)],
        truncation=True,
        padding="longest",
        max_length=max_seq_length,
        return_tensors="pt",
        add_special_tokens=False,
    )
    labels = torch.full_like(joint["input_ids"], IGNORE_INDEX)
    for row, context in enumerate(contexts):
        pad = int((joint["attention_mask"][row] == 0).sum())
        start = pad + len(tokenizer.tokenize(context))
        labels[row, start:] = joint["input_ids"][row, start:]
    return joint["input_ids"], joint["attention_mask"], labels


@pytest.mark.parametrize("max_seq_length", [300, 58, 52])  # no cut, response cut, context cut
def test_collator_matches_the_reference(processor, max_seq_length):
    items = [
        item(processor, f"hi {LOCATOR}", [""], "a dog barks."),
        item(processor, f"describe this clip, please: {AUDIO_START}{LOCATOR}{AUDIO_END}", ["hello"], "ok."),
    ]
    batch = DeSTA25Collator(processor, max_seq_length=max_seq_length)(items)
    input_ids, attention_mask, labels = reference_batch(processor, items, max_seq_length)
    torch.testing.assert_close(batch["input_ids"], input_ids)
    torch.testing.assert_close(batch["attention_mask"], attention_mask)
    torch.testing.assert_close(batch["labels"], labels)
    assert batch["input_ids"].size(1) <= max_seq_length


def test_collator_batch_layout(processor):
    items = [
        item(processor, f"hi {LOCATOR}", [""], "a dog barks."),
        item(processor, f"describe this clip, please: {AUDIO_START}{LOCATOR}{AUDIO_END}", ["hello"], "ok."),
    ]
    batch = DeSTA25Collator(processor)(items)
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert input_ids.shape == mask.shape == labels.shape and input_ids.size(0) == 2
    eos = processor.eos_token_id
    for row, entry in enumerate(items):
        target = encode(processor, entry["response"]) + [eos]
        length = int(mask[row].sum())
        pad = input_ids.size(1) - length
        assert mask[row].tolist() == [0] * pad + [1] * length  # left padding
        assert (input_ids[row, :pad] == processor.pad_token_id).all()
        # Only the response and its EOS are labelled, at the end of the row.
        assert labels[row, -len(target) :].tolist() == target == input_ids[row, -len(target) :].tolist()
        assert (labels[row, : -len(target)] == IGNORE_INDEX).all()
    assert int(mask[0].sum()) < input_ids.size(1)  # the shorter row is padded
    assert [ids.shape for ids in batch["batch_transcription_ids"]] == [(1, 0), (1, 5)]
    assert batch["batch_transcription_ids"][1].tolist() == [encode(processor, "hello")]
    positions = batch["batch_start_positions"]
    assert [row for row, _ in positions] == [0, 1]
    for (row, start), ids in zip(positions, batch["batch_transcription_ids"], strict=True):
        assert type(row) is int and type(start) is int
        span = input_ids[row, start : start + K + ids.size(1)]
        assert (span == processor.placeholder_id).all() and input_ids[row, start - 1] != processor.placeholder_id
        assert input_ids[row, start + K + ids.size(1)] != processor.placeholder_id
    waves = [wave for entry in items for wave in entry["waveforms"]]
    assert batch["batch_features"].shape == (2, MELS, FRAMES)
    torch.testing.assert_close(batch["batch_features"], processor.features(waves))


def test_collator_truncates_and_drops_cut_audio(processor, caplog):
    short = item(processor, f"{LOCATOR}", [""], "a long response that truncation cuts.")
    late = item(processor, f"a question that puts the audio late: {LOCATOR}", ["words"], "ok.")
    context = len(processor.expand_prompt(short["context"], [0])[0])
    max_seq_length = context + 5
    with caplog.at_level(logging.WARNING, logger="orca_model.data"):
        batch = DeSTA25Collator(processor, max_seq_length=max_seq_length)([late, short])
    assert (
        "dropping the sample of ['clip0.wav']" in caplog.text and f"max_seq_length is {max_seq_length}" in caplog.text
    )
    assert batch["input_ids"].shape == (1, max_seq_length)
    assert batch["labels"][0, -5:].tolist() == encode(processor, short["response"])[:5]  # no EOS: cut off
    start = processor.expand_prompt(short["context"], [0])[1][0]
    assert batch["batch_start_positions"] == [(0, start)] and batch["batch_features"].shape == (1, MELS, FRAMES)
    with pytest.raises(ValueError, match="every sample of the batch"):
        DeSTA25Collator(processor, max_seq_length=10)([late])


# ---------------------------------------------------------------------- dataset


def write_manifest(path, records) -> str:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for index, rate in enumerate([16000, 8000, 44100]):
        write_wav(root / f"clip{index}.wav", 0.2, rate=rate, kind="noise", seed=index)
    (root / "bad.wav").write_bytes(b"garbage" * 40)
    return root


def test_prompt_only_manifest(tmp_path, data_root, processor):
    manifest = write_manifest(
        tmp_path / "train.jsonl",
        [
            {"id": "clip0.wav", "prompt": "Describe the audio.", "response": "A dog barks.", "messages": "ignored"},
            {"id": "clip1.wav", "prompt": f"What is in {LOCATOR}?", "response": "Rain."},
        ],
    )
    dataset = ManifestDataset(manifest, processor, data_root=data_root, system_prompt="Listen.")
    assert len(dataset) == 2
    first = dataset[0]
    assert first["context"] == user_prompt(processor, f"Describe the audio. {LOCATOR}", system="Listen.")
    assert first["transcriptions"] == [""] and first["response"] == "A dog barks." and first["index"] == 0
    assert first["audio_paths"] == [str(data_root / "clip0.wav")]
    assert [wave.shape for wave in first["waveforms"]] == [(3200,)]
    assert dataset[1]["context"].count(LOCATOR) == 1  # not appended twice
    assert dataset[1]["waveforms"][0].shape == (3200,)  # resampled from 8 kHz
    batch = DeSTA25Collator(processor)([dataset[0], dataset[1]])
    assert batch["batch_features"].shape == (2, MELS, FRAMES) and batch["batch_transcription_ids"][0].shape == (1, 0)


def test_messages_manifest(tmp_path, data_root, processor):
    absolute = str(data_root / "clip2.wav")
    manifest = write_manifest(
        tmp_path / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Focus on the audio."},
                    {
                        "role": "user",
                        "content": f"What is said? {AUDIO_START}{LOCATOR}{AUDIO_END}",
                        "audios": [{"audio": "clip0.wav", "text": "hello"}],
                    },
                ],
                "response": "Hello.",
            },
            {
                "id": "sample-2",
                "messages": [
                    {
                        "role": "user",
                        "content": f"Compare {LOCATOR} with {AUDIO_START}{LOCATOR}{AUDIO_END}.",
                        "audios": [{"audio": "clip1.wav", "text": None}, {"audio": absolute}],
                    }
                ],
                "response": "Same.",
            },
        ],
    )
    dataset = ManifestDataset(manifest, processor, data_root=data_root, system_prompt="Unused here.")
    first, second = dataset[0], dataset[1]
    assert first["transcriptions"] == ["hello"] and second["transcriptions"] == ["", ""]
    assert second["audio_paths"] == [str(data_root / "clip1.wav"), absolute]
    # The record's own system message wins; a record without one gets the system prompt.
    assert first["context"].count("<|im_start|>system\nFocus on the audio.<|im_end|>") == 1
    assert "Unused here." not in first["context"] and "Unused here." in second["context"]
    batch = DeSTA25Collator(processor)([first, second])
    assert batch["batch_features"].shape == (3, MELS, FRAMES)
    assert [ids.size(1) for ids in batch["batch_transcription_ids"]] == [5, 0, 0]
    assert [row for row, _ in batch["batch_start_positions"]] == [0, 1, 1]
    for (row, start), ids in zip(batch["batch_start_positions"], batch["batch_transcription_ids"], strict=True):
        assert (batch["input_ids"][row, start : start + K + ids.size(1)] == processor.placeholder_id).all()


def test_empty_responses_are_dropped_with_one_warning(tmp_path, data_root, processor, caplog):
    manifest = write_manifest(
        tmp_path / "train.jsonl",
        [
            {"id": "clip0.wav", "prompt": "Describe.", "response": ""},
            {"id": "clip1.wav", "prompt": "Describe.", "response": "Rain."},
            {"id": "clip2.wav", "prompt": "Describe.", "response": None},
            {"id": "clip2.wav", "prompt": " ", "response": "Wind."},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="orca_model.data"):
        dataset = ManifestDataset(manifest, processor, data_root=data_root)
    assert len(dataset) == 1 and dataset[0]["response"] == "Rain."
    assert [r.getMessage() for r in caplog.records] == [
        "ManifestDataset: dropped 3 record(s) with an empty response or prompt"
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "clip0.wav", "prompt": "x", "response": ', "invalid JSON"),
        ("[1, 2]", "a record must be a JSON object, got list"),
        ('{"id": "clip0.wav", "prompt": "x"}', "the record has no 'response'"),
        (
            '{"id": "clip0.wav", "response": "y"}',
            "the record needs 'id' and 'prompt' (prompt-only format) or 'messages'",
        ),
        ('{"prompt": "x", "response": "y"}', "'id' must be the audio path"),
        ('{"id": "a.wav", "prompt": "x <|AUDIO|> <|AUDIO|>", "response": "y"}', "the prompt has 2 audio markers"),
        (
            '{"messages": [{"role": "user", "content": "a <|AUDIO|>"}], "response": "y"}',
            "message 0 (role 'user', content 'a <|AUDIO|>') has 1 audio marker in its content (<|AUDIO|> locators "
            "or <start_audio>…<end_audio> blocks) but 0 audios in its 'audios' list: give one audio per marker",
        ),
        (
            '{"messages": [{"role": "user", "content": "a", "audios": ["x.wav", "y.wav"]}], "response": "y"}',
            "message 0 (role 'user', content 'a') has 0 audio markers in its content (<|AUDIO|> locators "
            "or <start_audio>…<end_audio> blocks) but 2 audios in its 'audios' list",
        ),
        ('{"messages": [{"role": "user", "content": "a"}], "response": "y"}', "the record has no audio"),
        ('{"messages": [], "response": "y"}', "the messages must be a non-empty list of message dicts, got []"),
        ('{"messages": ["hi"], "response": "y"}', "message 0 must be a dict, got str: 'hi'"),
        (
            '{"messages": [{"role": "user", "content": 5}], "response": "y"}',
            "message 0 (role 'user', content 5): 'content' must be a string, got int",
        ),
        (
            '{"messages": [{"role": "user", "content": "a", "audios": {"audio": "x.wav"}}], "response": "y"}',
            "message 0 (role 'user', content 'a'): 'audios' must be a list, got dict",
        ),
        (
            '{"messages": [{"role": "user", "content": "<|AUDIO|>", "audios": [{"text": "t"}]}], "response": "y"}',
            "message 0 (role 'user', content '<|AUDIO|>'): audios[0]['audio'] must be the audio path (a non-empty "
            "string or path-like), got None",
        ),
        (
            '{"messages": [{"role": "user", "content": "<|AUDIO|>", "audios": [""]}], "response": "y"}',
            "message 0 (role 'user', content '<|AUDIO|>'): audios[0]['audio'] must be the audio path (a non-empty "
            "string or path-like), got ''",
        ),
        (
            '{"messages": [{"role": "user", "content": "<|AUDIO|>", "audios": [5]}], "response": "y"}',
            """message 0 (role 'user', content '<|AUDIO|>'): audios[0] must be {"audio": path, "text": optional """
            "transcription} or a path, got 5",
        ),
        (
            '{"messages": [{"role": "user", "content": "<|AUDIO|>", "audios": [{"audio": "x.wav", "text": 1}]}], '
            '"response": "y"}',
            "message 0 (role 'user', content '<|AUDIO|>'): audios[0]['text'] (audio 'x.wav') must be a string or "
            "None, got int",
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, processor, line, problem):
    good = {"id": "clip0.wav", "prompt": "Describe.", "response": "Rain."}
    manifest = write_manifest(tmp_path / "train.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=re.escape(f"ManifestDataset: {manifest}:3: {problem}")):
        ManifestDataset(manifest, processor)


def test_bad_audio_is_skipped_and_replaced_by_the_next_item(tmp_path, data_root, processor, caplog):
    records = [{"id": name, "prompt": "Describe.", "response": "Rain."} for name in ["clip0.wav", "missing.wav"]]
    records += [{"id": "bad.wav", "prompt": "Describe.", "response": "Rain."}]
    records += [{"id": "clip1.wav", "prompt": "Describe.", "response": "Rain."}]
    dataset = ManifestDataset(write_manifest(tmp_path / "train.jsonl", records), processor, data_root=data_root)
    with caplog.at_level(logging.WARNING, logger="orca_model.data"):
        replaced = dataset[1]
    assert replaced["index"] == 3 and replaced["audio_paths"] == [str(data_root / "clip1.wav")]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "skipping item 1" in messages[0] and f"'{data_root / 'missing.wav'}' does not exist" in messages[0]
    assert "skipping item 2" in messages[1] and f"'{data_root / 'bad.wav'}' cannot be decoded" in messages[1]
    assert dataset.skipped_files == 2
    assert dataset[0]["index"] == 0 and dataset.skipped_files == 2
    # The skip counter is shared with DataLoader workers.
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=DeSTA25Collator(processor))
    batches = list(loader)
    assert [batch["input_ids"].size(0) for batch in batches] == [2, 2]
    assert dataset.skipped_files == 2 + 3  # item 1 (two files) and item 2 (one)


def test_all_bad_audio_raises(tmp_path, data_root, processor, caplog):
    records = [{"id": name, "prompt": "Describe.", "response": "Rain."} for name in ["bad.wav", "gone.wav", "bad.wav"]]
    manifest = write_manifest(tmp_path / "train.jsonl", records)
    caplog.set_level(logging.ERROR, logger="orca_model.data")  # the skip warnings are tested above
    dataset = ManifestDataset(manifest, processor, data_root=data_root)
    with pytest.raises(RuntimeError, match=r"3 items in a row from index 1 have unreadable audio \(the last, item 0: "):
        dataset[1]
    assert dataset.skipped_files == 3
    limited = ManifestDataset(manifest, processor, data_root=data_root, max_skips=2)
    with pytest.raises(RuntimeError, match=r"2 items in a row from index 0 have unreadable audio \(the last, item 1: "):
        limited[0]
