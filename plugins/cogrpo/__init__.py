"""Co-GRPO: confidence re-mask sampler, fixed and learned schedules, the GRPO objective."""
