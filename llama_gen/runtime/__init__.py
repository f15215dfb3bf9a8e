"""The processes: torchrun's environment, process groups, collectives and the lifeline."""
