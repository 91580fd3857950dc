"""LRCL, stage 1 of ReaEmb: contrastive LoRA training of a causal LLM with a latent thought token.

    accelerate launch recipes/lrcl.py --config recipes/configs/lrcl_tiny.yaml          # CPU, seconds
    accelerate launch recipes/lrcl.py --config recipes/configs/lrcl_smollm2_ml100k.yaml  # CPU, embedded defaults
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/lrcl.py \
        --config recipes/configs/lrcl_paper.yaml                                        # GPUs, paper scale

Any field of `LRCLConfig` or `DataArguments` can be overridden on the command line, e.g. `--max_steps 50`.
`bf16: auto` trains in bf16 only where the CPU or GPU runs it fast (fp32 on an AVX2-only CPU, where emulated bf16
is ~12x slower); the precision chosen is printed and saved in the checkpoint's training_config.json.
The final checkpoint (adapter, thought module, prompt format) lands in `output_dir` and loads with
`ThoughtEmbedder.from_pretrained(output_dir)`.
"""

from reaemb_trl import LRCLConfig
from reaemb_trl.builders import DataArguments, build_lrcl_trainer, finish_training
from reaemb_trl.preflight import check_dataset, expected_failures, parse_recipe_args


def main() -> None:
    # Expected failures (missing config or dataset, bad fields or data) end with one `error:` line, exit code 1.
    data_args, config = parse_recipe_args(DataArguments, LRCLConfig)
    check_dataset(data_args.dataset)
    with expected_failures():
        trainer = build_lrcl_trainer(data_args, config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    finish_training(trainer, config.output_dir)


if __name__ == "__main__":
    main()
