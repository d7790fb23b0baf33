"""Training recipes on TRL: `reward` (RewardTrainer, soft labels), `ppo` (experimental PPO), `sft` (SFTTrainer).

Each module has ``make_parser()`` (a `trl.TrlParser` with TRL's option names),
``main(argv)`` (what ``rlcd-data train RECIPE`` runs) and ``train(...)`` taking
the parsed dataclasses. Presets live in ``recipes/*.yaml``.
"""
