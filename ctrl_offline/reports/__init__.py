"""What a run reports: evaluation reports and figures, the planner's figure, the measured KL efficiency
table, Hub model cards."""
