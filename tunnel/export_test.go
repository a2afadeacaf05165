package tunnel

// NumAgentEntries is how many agents the registry keeps state for, so tests
// can check that failed waits leave nothing behind.
func NumAgentEntries(r *MemoryRegistry) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.agents)
}
