//! Request coalescing (single-flight): concurrent misses for one page key
//! render once. A leaf module: it knows nothing of pages or memcached; the
//! layer decides what is shared and the write path only holds a [`Permit`].
//!
//! The first request for a key becomes the [`Leader`]; the others become
//! followers and wait for what the leader [`finish`](Leader::finish)es with.
//! The flight stays open after the render, for as long as the leader's
//! permit is held (the layer hands it to the background write, so requests
//! arriving before nginx can answer them from memcached share the render).
//! Dropping the leader or its permit ends the flight; followers of a leader
//! that vanished (client gone, panic) see the channel close and render
//! themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// `None` while rendering; `Some(None)`: nothing to share; `Some(Some(v))`: share `v`.
type State<T> = Option<Option<T>>;

/// In-flight renders by key.
#[derive(Debug)]
pub(crate) struct Flights<T>(Mutex<HashMap<Vec<u8>, watch::Receiver<State<T>>>>);

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights(Mutex::default())
    }
}

/// What [`Flights::join`] made of a request.
pub(crate) enum Role<T> {
    /// Render, then [`Leader::finish`].
    Leader(Leader<T>),
    /// Wait for the leader with [`Follower::shared`].
    Follower(Follower<T>),
}

/// The request that renders for its key.
#[derive(Debug)]
pub(crate) struct Leader<T> {
    flight: Permit,
    sender: watch::Sender<State<T>>,
}

/// A request waiting for the leader of its key.
pub(crate) struct Follower<T>(watch::Receiver<State<T>>);

/// Keeps a flight open while held: requests for the key keep joining it.
pub(crate) struct Permit(Option<Box<dyn FnOnce() + Send + Sync>>);

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(end) = self.0.take() {
            end();
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Lead the flight for `key`, or follow the one in progress.
    pub(crate) fn join(self: &Arc<Self>, key: &[u8]) -> Role<T> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(receiver) = map.get(key) {
            return Role::Follower(Follower(receiver.clone()));
        }
        let (sender, receiver) = watch::channel(None);
        map.insert(key.to_vec(), receiver);
        let flights = Arc::clone(self);
        let key = key.to_vec();
        let end = move || {
            let mut map = flights.0.lock().unwrap_or_else(PoisonError::into_inner);
            map.remove(&key);
        };
        Role::Leader(Leader {
            flight: Permit(Some(Box::new(end))),
            sender,
        })
    }
}

impl<T> Leader<T> {
    /// Hand followers (present and arriving) `shared`, or `None`: render yourselves.
    pub(crate) fn finish(&self, shared: Option<T>) {
        self.sender.send_replace(Some(shared));
    }

    /// Keep the flight open past the leader (for the background write).
    /// Followers that arrive meanwhile get what [`finish`](Self::finish) gave.
    pub(crate) fn into_permit(self) -> Permit {
        // Followers hold receivers of the watch channel, which keeps the
        // finished value readable after the sender is gone.
        self.flight
    }
}

impl<T: Clone> Follower<T> {
    /// What the leader shared; `None` when it shared nothing or went away.
    pub(crate) async fn shared(mut self) -> Option<T> {
        self.0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|state| state.clone().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_what_the_leader_finished_with_until_the_permit_is_dropped() {
        let flights: Arc<Flights<u32>> = Arc::default();
        let Role::Leader(leader) = flights.join(b"k") else {
            panic!("first request must lead");
        };
        let Role::Follower(early) = flights.join(b"k") else {
            panic!("second request must follow");
        };
        leader.finish(Some(7));
        let permit = leader.into_permit();
        assert_eq!(early.shared().await, Some(7));
        let Role::Follower(late) = flights.join(b"k") else {
            panic!("the permit keeps the flight open");
        };
        assert_eq!(late.shared().await, Some(7));
        drop(permit);
        assert!(matches!(flights.join(b"k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn followers_of_a_vanished_leader_render_themselves() {
        let flights: Arc<Flights<u32>> = Arc::default();
        let leader = flights.join(b"k");
        let Role::Follower(follower) = flights.join(b"k") else {
            panic!("second request must follow");
        };
        drop(leader);
        assert_eq!(follower.shared().await, None);
    }
}
