"""The bottom layer: what every other layer may use and that knows nothing of VGG networks, data or runs (errors,
bounds shared by every verb, atomic files and the output guard, timing, /proc/stat, plots, schedules)."""
