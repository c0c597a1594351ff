//! driver.rs's cases with coild as a driver of the node machine
//! (`--engine machine`, cli/src/coild/daemon/engine.rs): the same
//! requests, kills, reboots and store outages, the same expectations, so
//! the two engines are held to one behaviour.

mod fakekube;
mod simkit;

const ENGINE: coil_cli::coild::EngineChoice = coil_cli::coild::EngineChoice::Machine;

include!("driver_cases/cases.rs");
