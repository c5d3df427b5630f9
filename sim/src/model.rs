//! The oracle: what each account's record may be, given every answer the
//! clients saw, and a check of every new answer against it.
//!
//! Operations on one account are issued one at a time (a client holds the
//! account while it works on it), so the record's history is a sequence.
//! An answer the clients could not read (the node went down, the write
//! timed out, leadership moved) leaves the model with both possibilities —
//! applied and not applied — and such a write may still apply later, as long
//! as the record is as it was when the write was computed (writes are
//! compare-and-set on the record's sequence number). A write that is
//! acknowledged settles every earlier uncertain one: they either applied
//! before it or never will.
//!
//! A recovery's second write (the reset after a verified KE3, the lockout
//! after the last wrong one) is committed behind the answer: the answer says
//! what was computed, and the write may still be lost or land later (on the
//! record it was computed from only), so the model keeps both, like a write
//! whose answer was lost. A reset may be lost or late; a charge never.
//!
//! What it catches: a count of guesses left (in the owner's Status) or a
//! lockout that no possible history explains (a charge lost, counted twice,
//! or made after the KE2 was released: invariants 1, 2 and 8), a secret
//! released from a destroyed record or one other than the registered one
//! (3, 4), a record that has more guesses than any history gives it, and a
//! reset or lockout seen to have applied that is later undone (3, 4, 8).
//! Answers to strangers carry no count (issue 16): the sim's clients, who
//! own their accounts, ask Status after each charge to see it.

use std::collections::BTreeSet;

use hsm_vault::core::APPARENT_LIMIT;

/// What a record is, as far as the oracle cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Body {
    Absent,
    /// Made by a recovery start for an unknown account.
    Phantom,
    /// Registered with the sim's secret number `n`.
    Registered(u32),
    Locked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub body: Body,
    pub used: u8,
    pub max: u8,
}

const ABSENT: Record = Record {
    body: Body::Absent,
    used: 0,
    max: 0,
};

/// A request that may change the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Register {
        secret: u32,
        max: u8,
    },
    /// RecoverStart (also the first step of a deletion).
    Charge,
    /// RecoverFinish without a valid KE3 (wrong password, phantom record).
    FinishWrong,
    /// RecoverFinish with a valid KE3.
    FinishRight,
    /// Delete with a valid KE3.
    Delete,
    /// Status (reads only).
    Status,
}

/// An answer the service gives. A stranger's answers carry no count of
/// guesses left (only the owner's Status does): what the oracle learns of a
/// record's counter comes from Status, and from when `locked` comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Registered,
    Challenge,
    Locked,
    WrongPassword,
    Recovered {
        secret: u32,
    },
    Deleted,
    NotRegistered,
    Active {
        remaining: u8,
        max: u8,
    },
    LockedStatus {
        max: u8,
    },
    /// The service refuses (FAILED_PRECONDITION): nothing written.
    Refused,
}

/// Its secret destroyed; the count goes on.
fn destroyed(r: Record) -> Record {
    Record {
        body: Body::Locked,
        ..r
    }
}

/// What the service answers for `op` on record `r`, and what it writes.
/// Every record answers a stranger as if its limit were [`APPARENT_LIMIT`];
/// one registered with a lower limit has its secret destroyed at its own
/// limit and answers like the rest until then.
pub fn step(op: Op, r: Record) -> (Answer, Option<Record>) {
    let remaining = r.max.saturating_sub(r.used);
    let exhausted = r.used >= APPARENT_LIMIT;
    match (op, r.body) {
        (Op::Register { secret, max }, _) => (
            Answer::Registered,
            Some(Record {
                body: Body::Registered(secret),
                used: 0,
                max,
            }),
        ),
        (Op::Charge, Body::Absent) => {
            let phantom = Record {
                body: Body::Phantom,
                used: 1,
                max: APPARENT_LIMIT,
            };
            (Answer::Challenge, Some(phantom))
        }
        (Op::Charge, Body::Locked) if exhausted => (Answer::Locked, None),
        (Op::Charge, _) if exhausted => (Answer::Locked, Some(destroyed(r))),
        // Its own limit reached, the destroying write lost: destroyed now.
        (Op::Charge, Body::Registered(_)) if remaining == 0 => (
            Answer::Challenge,
            Some(Record {
                used: r.used + 1,
                ..destroyed(r)
            }),
        ),
        (Op::Charge, _) => (
            Answer::Challenge,
            Some(Record {
                used: r.used + 1,
                ..r
            }),
        ),
        (Op::FinishWrong | Op::FinishRight | Op::Delete, Body::Absent) => (Answer::Refused, None),
        (Op::FinishWrong | Op::FinishRight | Op::Delete, Body::Locked) if exhausted => {
            (Answer::Locked, None)
        }
        (Op::FinishWrong | Op::FinishRight | Op::Delete, Body::Locked) => {
            (Answer::WrongPassword, None)
        }
        (Op::FinishRight, Body::Registered(secret)) => {
            (Answer::Recovered { secret }, Some(Record { used: 0, ..r }))
        }
        (Op::Delete, Body::Registered(_)) => (Answer::Deleted, Some(ABSENT)),
        // A valid KE3 for a record that is now a phantom: another record.
        (Op::FinishRight | Op::Delete, Body::Phantom) => (Answer::Refused, None),
        (Op::FinishWrong, _) if exhausted => (Answer::Locked, Some(destroyed(r))),
        (Op::FinishWrong, Body::Registered(_)) if remaining == 0 => {
            (Answer::WrongPassword, Some(destroyed(r)))
        }
        (Op::FinishWrong, _) => (Answer::WrongPassword, None),
        (Op::Status, Body::Absent | Body::Phantom) => (Answer::NotRegistered, None),
        (Op::Status, Body::Registered(_)) => (
            Answer::Active {
                remaining,
                max: r.max,
            },
            None,
        ),
        (Op::Status, Body::Locked) => (Answer::LockedStatus { max: r.max }, None),
    }
}

/// Whether `op` answered `answer` before its write committed: the second
/// write of a recovery, which the service commits behind its answer (the
/// reset; the lockout or destruction after a wrong guess).
fn written_behind(op: Op, answer: Answer) -> bool {
    matches!(
        (op, answer),
        (Op::FinishRight, Answer::Recovered { .. })
            | (Op::FinishWrong, Answer::Locked | Answer::WrongPassword)
    )
}

/// What the clients saw of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Answer(Answer),
    /// Refused before anything was written (a conflict, a bad or stale
    /// login, a rate limit).
    NotApplied,
    /// No answer, or one that does not say whether the write happened.
    Unknown,
}

/// The possible records of one account.
#[derive(Clone, Debug)]
pub struct Account {
    possible: BTreeSet<Record>,
    /// Uncertain writes that may still apply: (record they were computed
    /// from, record they write).
    pending: Vec<(Record, Record)>,
}

impl Default for Account {
    fn default() -> Self {
        Account {
            possible: BTreeSet::from([ABSENT]),
            pending: Vec::new(),
        }
    }
}

impl Account {
    /// Lets uncertain writes apply to any record they were computed from.
    fn close(&mut self) {
        loop {
            let mut grew = false;
            for (from, to) in &self.pending {
                if self.possible.contains(from) {
                    grew |= self.possible.insert(*to);
                }
            }
            if !grew {
                return;
            }
        }
    }

    /// Checks what was seen of `op` against the model and narrows it.
    pub fn observe(&mut self, op: Op, seen: Seen) -> Result<(), String> {
        self.close();
        match seen {
            Seen::NotApplied => Ok(()),
            Seen::Unknown => {
                let writes: Vec<(Record, Record)> = self
                    .possible
                    .iter()
                    .filter_map(|r| step(op, *r).1.map(|w| (*r, w)))
                    .collect();
                for (_, to) in &writes {
                    self.possible.insert(*to);
                }
                self.pending.extend(writes);
                self.close();
                Ok(())
            }
            Seen::Answer(answer) => {
                let fits: Vec<(Record, Option<Record>)> = self
                    .possible
                    .iter()
                    .map(|r| (*r, step(op, *r)))
                    .filter(|(_, (a, _))| *a == answer)
                    .map(|(r, (_, w))| (r, w))
                    .collect();
                if fits.is_empty() {
                    return Err(format!(
                        "{op:?} answered {answer:?}, but the record can only be one of {:?}",
                        self.possible
                    ));
                }
                if written_behind(op, answer) {
                    // The write may be lost, or land later on the record
                    // it was computed from.
                    self.possible.clear();
                    for (r, w) in fits {
                        self.possible.insert(r);
                        if let Some(w) = w {
                            self.possible.insert(w);
                            self.pending.push((r, w));
                        }
                    }
                    self.close();
                    return Ok(());
                }
                let wrote = fits.iter().all(|(_, w)| w.is_some());
                self.possible = fits.into_iter().map(|(r, w)| w.unwrap_or(r)).collect();
                if wrote {
                    self.pending.clear();
                }
                self.close();
                Ok(())
            }
        }
    }

    /// How many records the account might hold (a measure of uncertainty).
    pub fn spread(&self) -> usize {
        self.possible.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(max: u8) -> Account {
        let mut a = Account::default();
        a.observe(
            Op::Register { secret: 1, max },
            Seen::Answer(Answer::Registered),
        )
        .expect("registration fits");
        a
    }

    fn charge(a: &mut Account) {
        a.observe(Op::Charge, Seen::Answer(Answer::Challenge))
            .expect("a challenge");
    }

    fn status(a: &mut Account, remaining: u8, max: u8) -> Result<(), String> {
        a.observe(Op::Status, Seen::Answer(Answer::Active { remaining, max }))
    }

    #[test]
    fn a_lost_charge_is_caught() {
        let mut a = registered(3);
        charge(&mut a);
        status(&mut a, 2, 3).expect("first guess");
        charge(&mut a);
        // The same count again: the second charge was lost.
        let e = status(&mut a, 2, 3).expect_err("a repeated count is a lost charge");
        assert!(e.contains("Active"), "{e}");
    }

    #[test]
    fn an_unknown_outcome_allows_both_and_a_later_answer_settles_it() {
        let mut a = registered(3);
        a.observe(Op::Charge, Seen::Unknown).expect("unknown");
        assert_eq!(a.spread(), 2);
        charge(&mut a);
        assert_eq!(a.spread(), 2);
        status(&mut a, 1, 3).expect("the first charge applied after all");
        assert_eq!(a.spread(), 1);
    }

    #[test]
    fn a_secret_after_its_limit_is_caught() {
        let mut a = registered(1);
        charge(&mut a);
        // The limit is reached: the secret is destroyed (behind the answer),
        // and the answer is the one any record with guesses left gives.
        a.observe(Op::FinishWrong, Seen::Answer(Answer::WrongPassword))
            .expect("wrong");
        // A right password needs a new login, whose start finds the secret
        // destroyed (or, had that write been lost, destroys it then).
        charge(&mut a);
        a.observe(
            Op::FinishRight,
            Seen::Answer(Answer::Recovered { secret: 1 }),
        )
        .expect_err("a destroyed record released its secret");
    }

    fn recovered_after_two_guesses() -> Account {
        let mut a = registered(5);
        charge(&mut a);
        charge(&mut a);
        a.observe(
            Op::FinishRight,
            Seen::Answer(Answer::Recovered { secret: 1 }),
        )
        .expect("recovered");
        a
    }

    #[test]
    fn a_reset_may_be_lost_but_never_gives_more_guesses() {
        // Lost: the next charge counts on from the two before.
        let mut a = recovered_after_two_guesses();
        charge(&mut a);
        status(&mut a, 2, 5).expect("a lost reset leaves fewer guesses");
        // Applied: the next charge is the first since the reset.
        let mut b = recovered_after_two_guesses();
        charge(&mut b);
        status(&mut b, 4, 5).expect("the reset applied");
        // Never more than a fresh record has.
        let mut c = recovered_after_two_guesses();
        charge(&mut c);
        status(&mut c, 5, 5).expect_err("more guesses than the limit");
    }

    #[test]
    fn a_reset_seen_to_apply_is_never_undone() {
        let mut a = recovered_after_two_guesses();
        charge(&mut a);
        status(&mut a, 4, 5).expect("the reset applied");
        charge(&mut a);
        status(&mut a, 2, 5).expect_err("the reset was undone");
    }

    #[test]
    fn a_destruction_behind_its_answer_still_refuses_every_guess() {
        let mut a = registered(1);
        charge(&mut a);
        a.observe(Op::FinishWrong, Seen::Answer(Answer::WrongPassword))
            .expect("the limit");
        // Whether the destroying write landed or not, the next start finds
        // (or makes) the secret destroyed.
        charge(&mut a);
        status(&mut a, 0, 1).expect_err("a registered record after its limit");
        a.observe(Op::Status, Seen::Answer(Answer::LockedStatus { max: 1 }))
            .expect("destroyed");
    }

    /// A stranger's answers for a record registered with 3 guesses and for
    /// an unknown account are the same, guess after guess, up to and past
    /// the apparent limit.
    #[test]
    fn a_low_limit_record_answers_like_an_unknown_one() {
        let mut real = registered(3);
        let mut unknown = Account::default();
        for guess in 1..=APPARENT_LIMIT {
            for a in [&mut real, &mut unknown] {
                charge(a);
                let last = if guess == APPARENT_LIMIT {
                    Answer::Locked
                } else {
                    Answer::WrongPassword
                };
                a.observe(Op::FinishWrong, Seen::Answer(last))
                    .unwrap_or_else(|e| panic!("guess {guess}: {e}"));
            }
        }
        for a in [&mut real, &mut unknown] {
            a.observe(Op::Charge, Seen::Answer(Answer::Locked))
                .expect("locked for all");
        }
    }
}
