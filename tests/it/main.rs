//! The integration test binary: real Nix, real git, real HTTP on loopback.

mod agent;
mod build;
mod cache;
mod common;
mod crash;
mod disk;
pub mod fleet_bench;
mod format;
mod freshness;
mod machine;
mod module;
mod nix_files;
mod refusals;
mod release;
mod report;
mod rollback;
pub mod rollout;
mod tls;
