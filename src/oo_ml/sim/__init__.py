"""The offline simulator: `world` (personas, contexts, rewards from a seed), `runner`
(policies on the world, logging, off-policy replay, the gate) and `report` (text tables)."""
