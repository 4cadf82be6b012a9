//! Placeholder until the codec bench lands.
fn main() {}
