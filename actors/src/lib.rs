//! Tessera's actor side. For now: what a node has ([`inventory`]) and how its devices are split
//! between inference and training. The supervision tree, inference and trainer actors come next.

pub mod inventory;
