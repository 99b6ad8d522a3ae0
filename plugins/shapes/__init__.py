"""The embedded world: procedural shape scenes, exact rewards and a small MDM."""
