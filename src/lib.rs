//! presence-hub: a real-time presence and routing hub for live-chat platforms.
//!
//! Layout: the rules are pure (`presence`, `rules`, `assign`), `core` applies them to the
//! state under one lock, `hub` is the handle around it, `ws` and `api` are the edges,
//! `store` persists, `server` accepts connections.

pub mod answer;
pub mod api;
pub mod assign;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod command;
pub mod config;
pub mod console;
pub mod core;
pub mod error;
pub mod event_type;
pub mod feed;
pub mod hours;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod note;
pub mod peer;
pub mod presence;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod store;
pub mod timers;
pub mod trim;
pub mod webhooks;
pub mod ws;
