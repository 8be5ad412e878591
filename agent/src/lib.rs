//! fleet-agent's library: the release format and its verifier (shared with `fleet-sign`), and
//! the agent itself.
//!
//! Everything under [`release`] is pure code: it parses and checks bytes handed to it and does
//! no I/O, so the signer, the agent and the tests all judge a release the same way.

pub mod activate;
pub mod bootloader;
pub mod channel;
pub mod config;
pub mod cycle;
pub mod durable;
pub mod failpoint;
pub mod health;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod nix;
pub mod notify;
pub mod process;
pub mod release;
pub mod report;
pub mod state;
pub mod tls;
