"""Motion planning: a CNN proposes initial trajectories for a GPMP2-style planner (GP motion
prior + SDF collision hinge + boundary priors, Levenberg-Marquardt with K iterations) on
procedural 2D maps, trained end to end and evaluated on maps never seen in training."""
