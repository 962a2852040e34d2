"""Mixture-of-experts models assembled from dense ones (what mergekit-moe does): see hf_vram.moe.assemble.

Nothing is re-exported here: a package attribute named `assemble` would hide the submodule of that name."""
