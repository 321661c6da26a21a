//! Harness for skiff's end-to-end tests: builds the real binary, runs real
//! agents against real containers in throw-away directories and cgroups, and
//! removes every container, cgroup, mount and process it made.

pub mod agent;
pub mod bench_mqtt;
pub mod bench_registry;
pub mod board;
pub mod fleet;
pub mod mqtt;
pub mod packaging;
pub mod registry;
pub mod sim_device;
