"""Training and evaluation. Recipes on TRL: `reward` (RewardTrainer, soft labels), `dpo` (DPOTrainer),
`ppo` (experimental PPO), `sft` (SFTTrainer); scoring with a trained reward model (`reward_model`); a reward
model against labelled pairs and a policy against its base (`evaluate`).

Each recipe module has ``make_parser()`` (a `trl.TrlParser` with TRL's option names),
``main(argv)`` (what ``rlcd-data train RECIPE`` runs) and ``train(...)`` taking
the parsed dataclasses. Presets live in ``recipes/*.yaml``.
"""
