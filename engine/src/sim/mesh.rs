//! Gossip routing as libp2p-gossipsub 0.50 does it with the settings the
//! node runs: the author sends a message to every connected peer (flood
//! publish, on by default), and a node that sees a message for the first
//! time forwards it to the peers of its mesh only.
//!
//! Each node's mesh holds up to [`MESH_N`] connected peers. A peer leaves it
//! when its connection closes; when a mesh has fewer than [`MESH_N_LOW`]
//! peers and more are connected, it is filled back to [`MESH_N`] with peers
//! drawn at random, as gossipsub's heartbeat does. With no more connected
//! peers than [`MESH_N`], the mesh is every connected peer and nothing is
//! drawn. The model leaves out what gossipsub adds on top (IHAVE/IWANT
//! gossip to peers outside the mesh, GRAFT/PRUNE making meshes symmetric,
//! scoring): each node still forwards to about [`MESH_N`] peers.

use crate::replication::random::{Random, SplitMix64};

/// Peers in a full mesh (gossipsub's `mesh_n`).
pub(crate) const MESH_N: usize = 6;

/// Below this many peers a mesh is filled again (gossipsub's `mesh_n_low`).
pub(crate) const MESH_N_LOW: usize = 5;

/// Every node's mesh.
pub(crate) struct Meshes {
    meshes: Vec<Vec<usize>>,
    rng: SplitMix64,
}

impl Meshes {
    /// Empty meshes for `n` nodes; draws come from `seed`, apart from the
    /// run's other random choices.
    pub(crate) fn new(n: usize, seed: u64) -> Meshes {
        Meshes {
            meshes: vec![Vec::new(); n],
            rng: SplitMix64::new(seed ^ 0x6d65_7368_6d65_7368),
        }
    }

    /// Node `node`'s mesh, in node order, given the peers it is connected
    /// to now (in node order).
    pub(crate) fn mesh_of(&mut self, node: usize, connected: &[usize]) -> Vec<usize> {
        if connected.len() <= MESH_N {
            self.meshes[node] = connected.to_vec();
            return connected.to_vec();
        }
        let mesh = &mut self.meshes[node];
        mesh.retain(|p| connected.binary_search(p).is_ok());
        if mesh.len() < MESH_N_LOW {
            let mut candidates: Vec<usize> = connected
                .iter()
                .copied()
                .filter(|p| !mesh.contains(p))
                .collect();
            while mesh.len() < MESH_N && !candidates.is_empty() {
                let i = self.rng.below(candidates.len() as u64) as usize;
                mesh.push(candidates.swap_remove(i));
            }
            mesh.sort_unstable();
        }
        mesh.clone()
    }

    /// Node `node` lost its state (a crash): its mesh is built again.
    pub(crate) fn forget(&mut self, node: usize) {
        self.meshes[node].clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_meshes_are_every_peer_and_large_ones_are_bounded_and_repaired() {
        let mut m = Meshes::new(20, 1);
        assert_eq!(m.mesh_of(0, &[1, 2, 3]), [1, 2, 3]);
        let all: Vec<usize> = (1..20).collect();
        let mesh = m.mesh_of(0, &all);
        assert_eq!(mesh.len(), MESH_N);
        assert_eq!(m.mesh_of(0, &all), mesh, "a full mesh stays as it is");
        // One mesh peer goes away: MESH_N_LOW left, kept as they are.
        let fewer: Vec<usize> = all.iter().copied().filter(|p| *p != mesh[0]).collect();
        let kept = m.mesh_of(0, &fewer);
        assert_eq!(kept.len(), MESH_N_LOW);
        assert!(kept.iter().all(|p| mesh.contains(p)));
        // Another goes: filled again from the connected peers.
        let fewer: Vec<usize> = fewer.into_iter().filter(|p| *p != kept[0]).collect();
        let refilled = m.mesh_of(0, &fewer);
        assert_eq!(refilled.len(), MESH_N);
        assert!(refilled.iter().all(|p| fewer.contains(p)));
    }
}
