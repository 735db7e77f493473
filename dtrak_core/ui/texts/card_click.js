function pick(e) {
  const card = e.target.closest('[data-index]');
  if (!card || !element.contains(card)) return;
  if (e.type === 'keydown') { if (e.key !== 'Enter' && e.key !== ' ') return; e.preventDefault(); }
  trigger('click', {index: Number(card.dataset.index)});
}
element.addEventListener('click', pick);
element.addEventListener('keydown', pick);
