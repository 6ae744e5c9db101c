//! The last answers the store gave, by key, to serve while it cannot answer. Meant for
//! answers that do not go stale in a way that matters during an outage: which checkpoint a
//! model name stands for (committed checkpoints are immutable).

use std::collections::HashMap;
use std::sync::Mutex;

/// Bounded: beyond `capacity` keys the oldest answer is forgotten.
pub struct LastKnown<V> {
    capacity: usize,
    answers: Mutex<Answers<V>>,
}

/// A clock, and each key's answer with the clock's value when it was given.
type Answers<V> = (u64, HashMap<String, (u64, V)>);

impl<V: Clone> LastKnown<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            answers: Mutex::default(),
        }
    }

    /// Passes `answer` through, remembering it when it is a value; when it is an error that
    /// `unavailable` says comes from an unreachable store, the last value for `key` instead
    /// (if there is one).
    pub fn through<E>(
        &self,
        key: &str,
        answer: Result<V, E>,
        unavailable: impl Fn(&E) -> bool,
    ) -> Result<V, E> {
        let mut guard = self.answers.lock().expect("last known answers");
        let (clock, answers) = &mut *guard;
        match answer {
            Ok(value) => {
                *clock += 1;
                if answers.len() >= self.capacity && !answers.contains_key(key) {
                    let oldest = answers
                        .iter()
                        .min_by_key(|(_, (t, _))| *t)
                        .map(|(k, _)| k.clone());
                    if let Some(oldest) = oldest {
                        answers.remove(&oldest);
                    }
                }
                answers.insert(key.to_string(), (*clock, value.clone()));
                Ok(value)
            }
            Err(e) if unavailable(&e) => match answers.get(key) {
                Some((_, value)) => Ok(value.clone()),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_last_answer_only_while_the_store_is_unreachable() {
        let cache = LastKnown::<u32>::new(2);
        let down = |e: &&str| *e == "down";
        assert_eq!(cache.through("a", Ok(1), down), Ok(1));
        assert_eq!(cache.through("a", Err("down"), down), Ok(1));
        // Other errors (not found, say) are the store's answer: passed through.
        assert_eq!(cache.through("a", Err("gone"), down), Err("gone"));
        assert_eq!(cache.through("b", Err("down"), down), Err("down"));
        assert_eq!(cache.through("b", Ok(2), down), Ok(2));
        assert_eq!(cache.through("c", Ok(3), down), Ok(3));
        // Capacity 2: the oldest answer (a) was forgotten.
        assert_eq!(cache.through("a", Err("down"), down), Err("down"));
        assert_eq!(cache.through("c", Err("down"), down), Ok(3));
    }
}
