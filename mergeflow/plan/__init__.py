"""Planning: a config and the input headers become a MergePlan, pure data (plan_merge)."""

from __future__ import annotations

from mergeflow.plan.planner import Input, MergePlan, Stage, TensorPlan, plan_merge

__all__ = ["Input", "MergePlan", "Stage", "TensorPlan", "plan_merge"]
