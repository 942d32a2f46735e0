//! The control API (`proto/jai.proto`, package `jai.v1`), compiled by
//! `build.rs`: the agent serves it (`control_server`), `jaictl` calls it
//! (`control_client`). A crate of its own so the cluster model
//! (`jai-proto`) and the HA core (`jai-ha`) stay free of tonic and tokio.

#![allow(missing_docs, clippy::all)]
tonic::include_proto!("jai.v1");
