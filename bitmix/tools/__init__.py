"""Command-line tools over the library (`bitmix simulate`, `bitmix bench model`): they sit above the compiler."""
