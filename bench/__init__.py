"""`make bench`: measured figures and ratios against baselines taken in the same run."""
