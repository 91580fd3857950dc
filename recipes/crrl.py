"""CRRL, stage 2 of ReaEmb: GRPO on the latent thought with collaborative rewards; the LLM stays frozen.

    accelerate launch recipes/crrl.py --config recipes/configs/crrl_tiny.yaml           # CPU, seconds
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/crrl.py \
        --config recipes/configs/crrl_paper.yaml                                        # GPUs, paper scale

Run the LRCL stage first (`recipes/lrcl.py` with the matching config); `lrcl_checkpoint` names its output folder.
Any field of `CRRLConfig` or `DataArguments` can be overridden on the command line, e.g. `--max_steps 50` or
`--reward_funcs rank my_pkg.rewards:fn --reward_weights 1.0 0.5`.
Candidates are built from the dataset's interactions (training part only: each user's last `holdout` items are
left out); items without any co-occurring item cannot be scored and are not trained on. With
`eval_item_fraction` > 0 a seeded share of the items is held out, and `eval_strategy: steps` scores the frozen
yardstick of reaemb_trl.crrl_yardstick on them every `eval_steps`. `bf16: auto` trains in bf16 only where the CPU or
GPU runs it fast; the precision chosen is printed and saved in training_config.json. The final checkpoint
(thought module, adapter, prompt format) lands in `output_dir` and loads with `ThoughtEmbedder.from_pretrained`.
"""

from pathlib import Path

from reaemb_trl.builders import DataArguments, build_crrl_trainer, finish_training
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.preflight import check_dataset, check_lrcl_checkpoint, expected_failures, parse_recipe_args


def main() -> None:
    # Expected failures (no LRCL checkpoint yet, missing config or dataset, bad fields or data) end with one
    # `error:` line naming what to run, exit code 1.
    data_args, config = parse_recipe_args(DataArguments, CRRLConfig)
    check_lrcl_checkpoint(config, Path(__file__).parent / "configs")
    check_dataset(data_args.dataset, interactions=True)
    with expected_failures():
        trainer = build_crrl_trainer(data_args, config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    finish_training(trainer, config.output_dir)


if __name__ == "__main__":
    main()
