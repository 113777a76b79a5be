"""Will a run fit: the peak-memory count on meta tensors and the planner on top of it.
"""
