"""Launch presets of scaling-train (conf/launch/sweep/<name>.yaml): on the search path of scaling-train only, so
that for every other command `sweep=<name>` is just the sweep's name."""
