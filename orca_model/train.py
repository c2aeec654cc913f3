"""Train ORCA-DeSTA from a JSONL manifest of audio files with `DeSTA25Trainer`.

One GPU (or the CPU):

    python -m orca_model.train --config configs/orca_hybrid_qwen3_0.6b.json \\
        --train_manifest train.jsonl --data_root /data/audio --output_dir runs/qwen3-0.6b

Several GPUs (DDP through the Trainer):

    torchrun --nproc-per-node 4 -m orca_model.train --config ... --train_manifest ... --output_dir ...

Every `transformers.TrainingArguments` option is accepted (`--per_device_train_batch_size 32`,
`--gradient_checkpointing`, `--max_steps`, `--logging_steps`, `--fsdp ...`), with the reference's
defaults (`DeSTA25TrainingArguments`). The fused kernels are on by default
(`--use_fused_orca False` runs the reference ops). See `--help`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import HfArgumentParser, set_seed

from orca_model.config import DeSTA25Config
from orca_model.data import DeSTA25Collator, ManifestDataset
from orca_model.modeling import DeSTA25AudioModel
from orca_model.processing import DeSTA25Processor
from orca_model.training import DeSTA25Trainer, DeSTA25TrainingArguments


@dataclass
class DataAndModelArguments:
    """What to train and on what (the rest is `DeSTA25TrainingArguments`)."""

    config: str = field(metadata={"help": "A DeSTA25Config JSON file, e.g. configs/orca_hybrid_qwen3_0.6b.json."})
    train_manifest: list[str] = field(metadata={"help": "JSONL manifest(s) of the training set."})
    eval_manifest: list[str] | None = field(default=None, metadata={"help": "JSONL manifest(s) to evaluate on."})
    data_root: str = field(default="", metadata={"help": "Directory the manifests' audio paths are relative to."})
    use_fused_orca: bool = field(default=True, metadata={"help": "Run the fused kernels (False: reference ops)."})
    use_lora: bool | None = field(default=None, metadata={"help": "LoRA on the LLM (default: the config's)."})
    max_seq_length: int = field(default=300, metadata={"help": "Tokens per training sequence (the reference's)."})
    system_prompt: str | None = field(default=None, metadata={"help": "A system prompt before every prompt."})


def main(argv: Sequence[str] | None = None) -> None:
    parser = HfArgumentParser((DataAndModelArguments, DeSTA25TrainingArguments), description=__doc__)
    data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    config = DeSTA25Config.from_json_file(data_args.config)
    config.use_fused_orca = data_args.use_fused_orca
    if data_args.use_lora is not None:
        config.use_lora = data_args.use_lora
    model = DeSTA25AudioModel(config)
    processor = DeSTA25Processor.from_config(config)
    datasets = {
        split: ManifestDataset(paths, processor, data_root=data_args.data_root, system_prompt=data_args.system_prompt)
        for split, paths in (("train", data_args.train_manifest), ("eval", data_args.eval_manifest))
        if paths
    }
    trainer = DeSTA25Trainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        data_collator=DeSTA25Collator(processor, max_seq_length=data_args.max_seq_length),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    for split, dataset in datasets.items():  # each skip was logged as it happened; the total once more
        if dataset.skipped_files:
            logging.getLogger("orca_model.train").warning(
                "%s: %d unreadable audio files were skipped (each replaced by the next item)",
                split,
                dataset.skipped_files,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
