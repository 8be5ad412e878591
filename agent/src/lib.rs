//! fleet-agent's library: the release format and its verifier, shared with `fleet-sign`.
//!
//! Everything under [`release`] is pure code: it parses and checks bytes handed to it and does
//! no I/O, so the signer, the agent and the tests all judge a release the same way.

pub mod release;
