"""Pure torch math: no Ray, no storage, no argument parsing."""
