//! The local stack for development and tests. Nothing here is used by the
//! controller or server code paths, and nothing here ships in the chart.

pub mod control_plane;
pub mod services;
pub mod stack;
