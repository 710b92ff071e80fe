"""Actions on alerts (issue 10): action rules, the engine, the state any process can follow.

- `model`: matching action rules against alerts, action ids, the steps of an action's life
- `state`: `ActionStore`, `ActionTopic` (read/write the compacted `actions` topic),
  `ActionFollower` (a thread following it; the proxy uses it)
- `engine`: `ActionEngine` / `run_engine` (`llmpulse actions run`)
- `ops`: `list_actions`, `approve_action`, `reject_action`, `undo_action`
- `hooks`: `run_hook`; `hints`: approval lines for notifications
(root causes are the rules' part: `llmpulse.streams.rules.rootcause.explain_window`)
"""
