//! skiff: the device agent and its command line.

mod image;
mod reconciler;

fn main() {}
