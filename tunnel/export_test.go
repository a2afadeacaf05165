package tunnel

// NumAgentEntries is how many agents the store keeps state for, so tests
// can check that failed waits leave nothing behind.
func NumAgentEntries(s *Store) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.agents)
}
