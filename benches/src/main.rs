//! Load harness (in progress).

fn main() {}
