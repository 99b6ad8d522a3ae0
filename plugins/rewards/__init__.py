"""Reward-model plug-ins: ImageReward, HPSv2, CLIP score."""
